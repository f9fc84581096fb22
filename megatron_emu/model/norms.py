"""Normalisation layers shared by the Causal Former (T5) and LLaMA."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm without mean subtraction or bias (T5 and LLaMA).

    Computed in fp32 and cast back, as both reference implementations do.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)
