"""Keys and values of the tokens seen so far, per LLaMA layer: autoregressive inference.

Emu generates an image's 32 visual embeddings one at a time, each fed back as the next
input embedding. With the cache each step runs the LLaMA on the one new position
against the stored keys and values of the prompt and the earlier steps, instead of on
the whole sequence again. Causal masks are bottom-right aligned (model/attention.py),
so a new query sees every cached key and itself, nothing else to set up.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    def __init__(self):
        self.length = 0  # positions stored (the next token's position)
        self._layers: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this layer's new (B, h, S_new, D) keys and values; return all of them."""
        if layer in self._layers:
            old_k, old_v = self._layers[layer]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self._layers[layer] = (k, v)
        return k, v
