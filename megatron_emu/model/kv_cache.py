"""Keys and values of the tokens seen so far, per LLaMA layer: autoregressive inference.

Emu generates an image's 32 visual embeddings one at a time, each fed back as the next
input embedding, and text one token at a time. With the cache each step runs the LLaMA
on the one new position against the stored keys and values of the prompt and the
earlier steps, instead of on the whole sequence again. Causal masks are bottom-right
aligned (model/attention.py), so a new query sees every cached key and itself.

Prompts of different lengths share a batch by left padding: `padding[b]` slots at the
start of row b hold no token. Row b's tokens are then positioned from 0 after its
padding and attend to no padding key (model/llama.py `padded_positions`), so each row
computes what it would alone. Beam search reorders the rows (`reorder`).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    def __init__(self, padding: torch.Tensor | None = None):
        self.length = 0  # positions stored (the next token's slot)
        self.padding = padding  # (B,) left-padding slots per row; None = no padding
        self._layers: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this layer's new (B, h, S_new, D) keys and values; return all of them."""
        if layer in self._layers:
            old_k, old_v = self._layers[layer]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self._layers[layer] = (k, v)
        return k, v

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding rows `rows` (B_new,) of this one, which stays as it is
        (one prompt's cache repeated for several continuations: likelihood scoring)."""
        copy = KVCache(self.padding)
        copy.length, copy._layers = self.length, dict(self._layers)
        copy.reorder(rows)
        return copy

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B_new,) of every layer, in that order (beam search)."""
        for layer, (k, v) in self._layers.items():
            self._layers[layer] = (k.index_select(0, rows), v.index_select(0, rows))
        if self.padding is not None:
            self.padding = self.padding.index_select(0, rows)
