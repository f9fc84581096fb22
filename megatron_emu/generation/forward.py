"""Emu's next-token logits for a batch of prompts: the prompt once, then one token per step.

Prompts of different lengths are left-padded into one batch; the KV cache carries the
padding so each row is positioned and attends as it would alone (model/kv_cache.py).
Logits of tokens text generation must never produce are -inf: [PAD], [IMG], [/IMG] and
<image> (never trained as labels: model/loss.py) and Megatron's padded vocabulary rows.

Tensor-parallel inference: shard the model with parallel/tensor_parallel.py's training plans
(`shard_for_inference`); the KV cache then holds each rank's heads, and the vocab-sharded
logits are gathered, so every rank picks the same tokens.

Pipeline-parallel inference: each rank holds one stage and its own KV cache; the stages
hand the hidden states on and the last one's logits reach every rank (stage_links.py).
"""

from __future__ import annotations

import torch

from megatron_emu.generation.prompts import Prompt
from megatron_emu.generation.stage_links import StageLinks
from megatron_emu.model.emu import Emu
from megatron_emu.model.kv_cache import KVCache


def left_pad(prompts: list[Prompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (B, S_max) with each prompt at the right end, padding (B,) slots per row."""
    width = max(len(p.tokens) for p in prompts)
    padding = torch.tensor([width - len(p.tokens) for p in prompts])
    tokens = torch.tensor([[pad_id] * (width - len(p.tokens)) + p.tokens for p in prompts])
    return tokens, padding


class CachedForward:
    """links: this rank's place in an inference pipeline (generation/stage_links.py); None:
    `emu` is the whole model. Every rank of a pipeline calls the same methods in the same
    order and gets the same logits."""

    def __init__(self, emu: Emu, links: StageLinks | None = None):
        self.emu = emu.eval()
        self.links = links
        self.pad_id = emu.config.special_tokens.pad
        self.vocab_size = emu.config.llm.vocab_size
        self.never = list(emu.config.special_tokens.ignored_in_ce)  # never generated as text
        self.cache: KVCache | None = None
        self.tokens: torch.Tensor | None = None  # (B, S) the padded prompts (for the repetition penalty)

    @property
    def device(self) -> torch.device:
        return next(self.emu.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What the stages send each other: the model's compute dtype."""
        return next(self.emu.parameters()).dtype

    @property
    def first(self) -> bool:
        """This rank embeds (vision tower, token embedding): the first stage, or the whole model."""
        return self.links is None or self.links.first

    @property
    def last(self) -> bool:
        """This rank holds the final norm and the heads."""
        return self.links is None or self.links.last

    @torch.no_grad()
    def start(self, prompts: list[Prompt]) -> torch.Tensor:
        """Run the prompts; -> (B, V) logits of each one's next token."""
        tokens, padding = left_pad(prompts, self.pad_id)
        self.tokens = tokens.to(self.device)
        self.cache = KVCache(padding.to(self.device) if int(padding.max()) else None)
        inputs = None
        if self.first:  # images are read on every rank (cheap) but encoded on the first stage only
            images = torch.cat([p.images for p in prompts])  # in row order = order of the <image> slots
            inputs = self.emu.embed(self.tokens, images.to(self.device))
        return self._next_logits(inputs, tuple(tokens.shape))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the tokens just chosen -> (B, V) logits of the ones after."""
        inputs = self.emu.llm.tok_embeddings(tokens[:, None]) if self.first else None  # (B, 1, H) in
        return self._next_logits(inputs, (tokens.shape[0], 1))

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)

    @torch.no_grad()
    def token_logprobs(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """(C, L) tokens continuing what `cache` holds -> (C, L-1) log p(tokens[:, 1:]) given
        the cache and the tokens before (likelihood scoring, evaluation/likelihood.py)."""
        inputs = self.emu.llm.tok_embeddings(tokens[:, :-1]) if self.first else None
        hidden = self._hidden(inputs, (tokens.shape[0], tokens.shape[1] - 1), cache)
        logprobs = None
        if hidden is not None:
            logprobs = self.vocab_logits(hidden).log_softmax(dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
        return self._from_last(logprobs, (tokens.shape[0], tokens.shape[1] - 1))

    def on_first_stage(self, compute, shape: tuple[int, ...]) -> torch.Tensor:
        """compute() where the vision tower is (the first stage), its float32 result on every rank."""
        return compute() if self.links is None else self.links.from_first(compute, shape)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) last-layer hidden states -> (..., V) float logits over the real vocabulary."""
        llm = self.emu.llm
        logits = llm.output(llm.norm(hidden))  # (..., V_padded); vocab-sharded DTensor under tensor parallelism
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()  # every rank decodes the same tokens from the whole vocabulary
        logits = logits[..., :self.vocab_size].float()  # padded rows dropped
        logits[..., self.never] = float("-inf")
        return logits

    def _hidden(self, inputs: torch.Tensor | None, shape: tuple[int, int], cache: KVCache) -> torch.Tensor | None:
        """This rank's LLaMA layers on `inputs` (the first stage's) or on what the previous
        stage sent; -> the last layer's (B, S, H) on the last stage, None before it."""
        if inputs is None:
            inputs = self.links.receive((*shape, self.emu.config.llm.hidden), self.dtype)
        hidden = self.emu.llm.forward_layers(inputs, cache=cache)
        if hasattr(hidden, "full_tensor"):
            hidden = hidden.full_tensor()
        if not self.last:
            self.links.send(hidden)
            return None
        return hidden

    def _next_logits(self, inputs: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        hidden = self._hidden(inputs, shape, self.cache)
        return self._from_last(None if hidden is None else self.vocab_logits(hidden[:, -1]), (shape[0], self.vocab_size))

    def _from_last(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        return value if self.links is None else self.links.from_last(value, shape)


def shard_for_inference(emu: Emu, tp_mesh) -> Emu:
    """Tensor parallelism over `tp_mesh` with the training plans (no sequence parallelism)."""
    from megatron_emu.parallel.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(emu, tp_mesh, emu.config, sequence_parallel=False)
    return emu
