"""LLaMA decoder (spec section 3): the multimodal model's language backbone.

Names follow torchtitan (tok_embeddings, layers.N.attention.{wq,wk,wv,wo},
layers.N.feed_forward.{w1,w2,w3}, attention_norm, ffn_norm, norm, output). Layers
live in a ModuleDict keyed by index so names survive pipeline splitting, and a stage
without `tok_embeddings` / `norm` / `output` (set to None) still runs.
Rotary embeddings use the Hugging Face "rotate half" layout, so transformers'
LlamaForCausalLM weights map one to one.

Packed rows (document ids given): positions restart at 0 with every document and
attention stays within it, so a packed document is computed exactly as it would be
alone in its own row.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_emu.config import LLaMAConfig
from megatron_emu.model.attention import DocumentMask, document_mask, document_starts, scaled_dot_product_attention
from megatron_emu.model.kv_cache import KVCache
from megatron_emu.model.norms import RMSNorm


def inverse_frequencies(config: LLaMAConfig, device=None) -> torch.Tensor:
    """(head_dim / 2,): theta^(-2i/d), scaled as config.rope_type says (transformers'
    modeling_rope_utils computes the same for "linear" and "llama3")."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    if config.rope_type == "linear":  # positions / factor, i.e. every frequency / factor
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        return llama3_frequencies(inv_freq, config)
    return inv_freq


def llama3_frequencies(inv_freq: torch.Tensor, config: LLaMAConfig) -> torch.Tensor:
    """Llama 3.1: wavelengths beyond original_max / low_freq_factor are stretched by the factor,
    those below original_max / high_freq_factor kept, the ones between interpolated."""
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_positions
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, smoothed, scaled)


def rotary_tables(config: LLaMAConfig, max_positions: int | None = None, device=None) -> torch.Tensor:
    """(2, max_positions, head_dim): cos and signed sin of position * inverse frequency
    (max_positions: config.max_positions unless given). The sin table carries rotate-half's
    sign, -sin on the first half and +sin on the second (see apply_rotary)."""
    inv_freq = inverse_frequencies(config, device)
    positions = config.max_positions if max_positions is None else max_positions
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq)  # (P, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)])


class Positions(NamedTuple):
    """Where every token sits, worked out once per forward and shared by all layers."""

    cos: torch.Tensor  # (S, D), or (B, 1, S, D) for packed rows
    sin: torch.Tensor  # signed: -sin on the first half of D, +sin on the second (rotary_tables)
    documents: DocumentMask | None = None  # packed rows only
    cache: KVCache | None = None  # inference: the keys and values of the tokens before these


def token_positions(rope: torch.Tensor, seq_length: int, document_ids: torch.Tensor | None = None,
                    cache: KVCache | None = None) -> Positions:
    """rope: (2, P, D) tables; document_ids: (B, S) for packed rows; cache: the tokens come
    after cache.length earlier ones (inference)."""
    if document_ids is None:
        if cache is not None and cache.padding is not None:
            return padded_positions(rope, seq_length, cache)
        start = cache.length if cache is not None else 0
        return Positions(rope[0, start:start + seq_length], rope[1, start:start + seq_length], None, cache)
    if cache is not None:
        raise ValueError("packed rows (document ids) and a KV cache do not combine")
    index = torch.arange(seq_length, device=document_ids.device).expand_as(document_ids)  # (B, S)
    first = torch.where(document_starts(document_ids), index, 0).cummax(dim=1).values  # each document's start
    position = index - first  # (B, S): 0 at every document's first token
    cos, sin = rope[0, position].unsqueeze(1), rope[1, position].unsqueeze(1)  # (B, 1, S, D)
    return Positions(cos, sin, document_mask(document_ids))


def padded_positions(rope: torch.Tensor, seq_length: int, cache: KVCache) -> Positions:
    """Left-padded rows (batched inference): row b's first cache.padding[b] slots hold no
    token; its tokens are positioned from 0 after them and see no padding key."""
    padding = cache.padding.to(rope.device)  # (B,)
    slots = torch.arange(cache.length, cache.length + seq_length, device=rope.device)  # (S,) of these tokens
    position = (slots - padding[:, None]).clamp(min=0)  # (B, S)
    keys = torch.arange(cache.length + seq_length, device=rope.device)  # (K,) every cached and new slot
    visible = (keys <= slots[:, None]) & (keys >= padding[:, None, None])  # (B, S, K)
    # A padding query sees itself only: its output is never used, but must stay finite.
    visible |= keys == slots[:, None]
    cos, sin = rope[0, position].unsqueeze(1), rope[1, position].unsqueeze(1)  # (B, 1, S, D)
    # A left-padded row is two documents, the padding (0) and the prompt (1): the attention's
    # packed-rows path takes the explicit (B, 1, S, K) mask.
    documents = (slots >= padding[:, None]).long()  # (B, S)
    return Positions(cos, sin, DocumentMask(documents, visible.unsqueeze(1), None, 0), cache)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, h, S, D); cos/sin: (S, D) or (B, 1, S, D), sin signed (rotary_tables).

    Rotate-half is x * cos + [-x2, x1] * [sin, sin]; the sign lives in the table instead,
    [x2, x1] * [-sin, sin], which is the same product bit for bit, without a negation of
    x (and its backward) in every layer."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + swapped * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LLaMAConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.hidden, config.hidden, bias=False)
        self.wk = nn.Linear(config.hidden, config.hidden, bias=False)
        self.wv = nn.Linear(config.hidden, config.hidden, bias=False)
        self.wo = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        B, S, _ = x.shape
        # -1 heads: a head-sharded copy (tensor parallel) runs unchanged.
        q = self.wq(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, h, S, D)
        k = self.wk(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        cos, sin = positions.cos.to(q.dtype), positions.sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if positions.cache is not None:  # keys/values of the earlier tokens, then these
            k, v = positions.cache.extend(self, k, v)  # (B, h, S_cached + S, D)
        out = scaled_dot_product_attention(q, k, v, causal=True, documents=positions.documents)  # (B, h, S, D)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LLaMAConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.feed_forward = FeedForward(config.hidden, config.ffn_dim)

    def forward(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), positions)
        return x + self.feed_forward(self.ffn_norm(x))


class LLaMA(nn.Module):
    """Token embedding -> decoder layers -> final norm -> LM head (untied)."""

    def __init__(self, config: LLaMAConfig):
        super().__init__()
        self.config = config
        # padded_vocab_size rows: --make-vocab-size-divisible-by (== vocab_size by default).
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.layers)})
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.output = nn.Linear(config.hidden, config.padded_vocab_size, bias=False)
        # Not persistent: recomputed on load and after meta-device materialisation.
        self.register_buffer("rope", self._rope_tables(), persistent=False)

    def _rope_tables(self, device=None) -> torch.Tensor:
        return rotary_tables(self.config, device=device)

    def forward_layers(self, h: torch.Tensor, document_ids: torch.Tensor | None = None,
                       cache: KVCache | None = None) -> torch.Tensor:
        """(B, S, H) -> (B, S, H); document_ids (B, S) for packed rows; cache: inference,
        `h` continues the tokens the cache holds (which it then holds too)."""
        total = h.shape[1] + (cache.length if cache is not None else 0)
        if total > self.config.max_positions:
            raise ValueError(f"sequence length {total} exceeds max positions {self.config.max_positions}")
        positions = token_positions(self.rope, h.shape[1], document_ids, cache)
        for layer in self.layers.values():
            h = layer(h, positions)
        if cache is not None:
            cache.length = total
        return h

    def init_rope(self) -> None:
        self.rope = self._rope_tables(device=self.rope.device)
