"""Emu's next-token logits for a batch of prompts: the prompt once, then one token per step.

Prompts of different lengths are left-padded into one batch; the KV cache carries the
padding so each row is positioned and attends as it would alone (model/kv_cache.py).
Logits of tokens text generation must never produce are -inf: [PAD], [IMG], [/IMG] and
<image> (never trained as labels: model/loss.py) and Megatron's padded vocabulary rows.

Tensor-parallel inference: shard the model with parallel/tensor_parallel.py's training plans
(`shard_for_inference`); the KV cache then holds each rank's heads, and the vocab-sharded
logits are gathered, so every rank picks the same tokens.
"""

from __future__ import annotations

import torch

from megatron_emu.generation.prompts import Prompt
from megatron_emu.model.emu import Emu
from megatron_emu.model.kv_cache import KVCache


def left_pad(prompts: list[Prompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (B, S_max) with each prompt at the right end, padding (B,) slots per row."""
    width = max(len(p.tokens) for p in prompts)
    padding = torch.tensor([width - len(p.tokens) for p in prompts])
    tokens = torch.tensor([[pad_id] * (width - len(p.tokens)) + p.tokens for p in prompts])
    return tokens, padding


class CachedForward:
    def __init__(self, emu: Emu):
        self.emu = emu.eval()
        self.pad_id = emu.config.special_tokens.pad
        self.vocab_size = emu.config.llm.vocab_size
        self.never = list(emu.config.special_tokens.ignored_in_ce)  # never generated as text
        self.cache: KVCache | None = None
        self.tokens: torch.Tensor | None = None  # (B, S) the padded prompts (for the repetition penalty)

    @property
    def device(self) -> torch.device:
        return self.emu.llm.tok_embeddings.weight.device

    @torch.no_grad()
    def start(self, prompts: list[Prompt]) -> torch.Tensor:
        """Run the prompts; -> (B, V) logits of each one's next token."""
        tokens, padding = left_pad(prompts, self.pad_id)
        images = torch.cat([p.images for p in prompts])  # in row order = order of the <image> slots
        self.tokens = tokens.to(self.device)
        self.cache = KVCache(padding.to(self.device) if int(padding.max()) else None)
        return self._next_logits(self.emu.embed(self.tokens, images.to(self.device)))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the tokens just chosen -> (B, V) logits of the ones after."""
        return self._next_logits(self.emu.llm.tok_embeddings(tokens[:, None]))  # (B, 1, H) in

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)

    def _next_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        llm = self.emu.llm
        hidden = llm.norm(llm.forward_layers(inputs, cache=self.cache)[:, -1])  # (B, H)
        logits = llm.output(hidden)  # (B, V_padded); vocab-sharded DTensor under tensor parallelism
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()  # every rank decodes the same tokens from the whole vocabulary
        logits = logits[:, :self.vocab_size].float()  # (B, V): padded rows dropped
        logits[:, self.never] = float("-inf")
        return logits


def shard_for_inference(emu: Emu, tp_mesh) -> Emu:
    """Tensor parallelism over `tp_mesh` with the training plans (no sequence parallelism)."""
    from megatron_emu.parallel.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(emu, tp_mesh, emu.config, sequence_parallel=False)
    return emu
