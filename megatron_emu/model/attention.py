"""Scaled dot-product attention: the one place where the attention kernel is chosen.

Every attention module in the model (EVA ViT, Causal Former, LLaMA) calls
`scaled_dot_product_attention`. The backend is a process-wide setting so the model
code stays free of kernel choices; `megatron_emu.kernels` picks it from flags and
from what is installed.
"""

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")
_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def scaled_dot_product_attention(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    *,
    causal: bool = False,
    bias: torch.Tensor | None = None,  # additive, broadcastable to (B, H, Sq, Sk)
    scale: float | None = None,  # None = 1/sqrt(D); T5 passes 1.0
) -> torch.Tensor:  # (B, H, Sq, D)
    if _backend == "math":
        return math_attention(q, k, v, causal=causal, bias=bias, scale=scale)
    if bias is not None and causal:
        # SDPA takes either a mask or is_causal; fold causality into the bias.
        bias = bias + causal_bias(q.shape[-2], k.shape[-2], q.dtype, q.device)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, scale=scale)


def math_attention(q, k, v, *, causal=False, bias=None, scale=None):
    """Reference implementation, in the input dtype: softmax(q k^T * scale + bias) v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores + causal_bias(q.shape[-2], k.shape[-2], scores.dtype, scores.device)
    return torch.matmul(scores.softmax(dim=-1), v)


def causal_bias(sq: int, sk: int, dtype: torch.dtype, device) -> torch.Tensor:  # (Sq, Sk)
    """0 where query i may see key j (j <= i + sk - sq), -inf elsewhere."""
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
