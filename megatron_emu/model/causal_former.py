"""Causal Transformer ("Causal Former", spec section 2).

A T5-decoder-style stack that turns the 257 visual tokens of one image into 32
embeddings in the LLM's space: 32 learned queries run causal self-attention among
themselves and cross-attention to the visual tokens. T5 conventions: RMSNorm without
mean subtraction, no biases, no 1/sqrt(d) scaling in attention (folded into the init),
ReLU FFN, and a relative position bias computed once (block 0) and shared by all blocks.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_emu.config import CausalFormerConfig
from megatron_emu.model.attention import scaled_dot_product_attention
from megatron_emu.model.norms import RMSNorm


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucketing: exact buckets for near positions, log-spaced beyond."""
    distance = (-relative_position).clamp(min=0)  # only the past is visible
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far_bucket = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    far_bucket = far_bucket.clamp(max=num_buckets - 1)
    return torch.where(distance < max_exact, distance, far_bucket)


class T5Attention(nn.Module):
    """Unscaled multi-head attention; `kv_dim` differs from d_model for cross-attention."""

    def __init__(self, d_model: int, heads: int, head_dim: int, kv_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k = nn.Linear(kv_dim, heads * head_dim, bias=False)
        self.v = nn.Linear(kv_dim, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias=None, causal=False) -> torch.Tensor:
        N, Tq, _ = x.shape
        Tk = context.shape[1]
        q = self.q(x).view(N, Tq, -1, self.head_dim).transpose(1, 2)  # (N, h, Tq, D)
        k = self.k(context).view(N, Tk, -1, self.head_dim).transpose(1, 2)  # (N, h, Tk, D)
        v = self.v(context).view(N, Tk, -1, self.head_dim).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, causal=causal, bias=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(N, Tq, -1))


class T5FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.wi = nn.Linear(d_model, ffn_dim, bias=False)
        self.wo = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class CausalFormerBlock(nn.Module):
    """Pre-norm: causal self-attention -> cross-attention to the image -> FFN."""

    def __init__(self, config: CausalFormerConfig, visual_dim: int):
        super().__init__()
        c = config
        self.self_attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = T5Attention(c.d_model, c.heads, c.head_dim, kv_dim=c.d_model)
        self.cross_attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.cross_attn = T5Attention(c.d_model, c.heads, c.head_dim, kv_dim=visual_dim)
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.ffn = T5FeedForward(c.d_model, c.ffn_dim)

    def forward(self, x, visual, position_bias):
        h = self.self_attn_norm(x)
        x = x + self.self_attn(h, h, bias=position_bias, causal=True)
        # T5 decoders add no position bias to cross-attention.
        x = x + self.cross_attn(self.cross_attn_norm(x), visual)
        return x + self.ffn(self.ffn_norm(x))


class CausalFormer(nn.Module):
    """(N, 257, visual_dim) visual tokens -> (N, 32, llm_hidden) visual embeddings."""

    def __init__(self, config: CausalFormerConfig, visual_dim: int, llm_hidden: int):
        super().__init__()
        self.config = config
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.d_model))
        # Block 0 owns the bias table in T5; here it sits beside the blocks, shared by all.
        self.relative_attention_bias = nn.Embedding(config.relative_buckets, config.heads)
        self.blocks = nn.ModuleList(CausalFormerBlock(config, visual_dim) for _ in range(config.layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.proj = nn.Linear(config.d_model, llm_hidden, bias=True)

    def position_bias(self, length: int, device) -> torch.Tensor:  # (1, heads, T, T)
        position = torch.arange(length, device=device)
        relative = position[None, :] - position[:, None]  # key - query, (T, T)
        c = self.config
        buckets = relative_position_bucket(relative, c.relative_buckets, c.relative_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        x = self.query_embeds.expand(visual.shape[0], -1, -1)  # (N, 32, d)
        bias = self.position_bias(x.shape[1], x.device).to(x.dtype)  # (1, h, 32, 32)
        for block in self.blocks:
            x = block(x, visual, bias)
        return self.proj(self.norm(x))  # (N, 32, llm_hidden)

    def init_stds(self, std: float) -> dict[str, float]:
        """T5's init, which stands in for the missing 1/sqrt(d) attention scaling (model/init.py)."""
        c = self.config
        stds = {"query_embeds": std, "relative_attention_bias.weight": c.d_model**-0.5}
        for i in range(len(self.blocks)):
            for attn in ("self_attn", "cross_attn"):
                stds.update({f"blocks.{i}.{attn}.q.weight": (c.d_model * c.head_dim) ** -0.5,
                             f"blocks.{i}.{attn}.k.weight": c.d_model**-0.5,
                             f"blocks.{i}.{attn}.v.weight": c.d_model**-0.5,
                             f"blocks.{i}.{attn}.o.weight": (c.heads * c.head_dim) ** -0.5})
            stds.update({f"blocks.{i}.ffn.wi.weight": c.d_model**-0.5, f"blocks.{i}.ffn.wo.weight": c.ffn_dim**-0.5})
        return stds
