"""CPU stand-ins for the GPU attention libraries, written from their documented contracts, so
that our calls into them (layouts, masks, cu_seqlens, scale) are tested where CI runs. The
real kernels are still compared with `math` by the CUDA tests of test_attention.py.

- flash_attn.flash_attn_func(q, k, v, dropout_p, softmax_scale, causal): q (B, Sq, H, D),
  k / v (B, Sk, H, D) -> (B, Sq, H, D); causal masks are bottom-right aligned (flash-attn
  >= 2.1); the last dimension must be contiguous.
- flash_attn.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal): the sequences of a batch concatenated,
  (total, H, D), sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] (int32).
- apex.normalization.fused_layer_norm.fused_rms_norm_affine(input, weight, normalized_shape,
  eps) and fused_layer_norm_affine(input, weight, bias, normalized_shape, eps): RMSNorm and
  LayerNorm over the trailing normalized_shape, computed in fp32, output in input's dtype.
- transformer_engine.pytorch.DotProductAttention(num_attention_heads, kv_channels,
  attention_dropout, qkv_format, attn_mask_type, softmax_scale); qkv_format "bshd": inputs
  (B, S, H, D), output (B, S, H * D); attn_mask_type "no_mask", "causal" (top-left
  aligned) or "causal_bottom_right".
"""

from __future__ import annotations

import math
import sys
import types

import torch


def reference(q, k, v, scale, keep):  # (B, H, Sq, D) ... keep (Sq, Sk) bool or None
    scores = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def causal_keep(sq: int, sk: int, bottom_right: bool) -> torch.Tensor:
    shift = sk - sq if bottom_right else 0
    return torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + shift


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:], "flash: (B, S, H, D) inputs"
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "flash: the last dimension must be contiguous"
    assert dropout_p == 0.0
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    keep = causal_keep(q.shape[1], k.shape[1], bottom_right=True) if causal else None
    bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
    return reference(bhsd(q), bhsd(k), bhsd(v), scale, keep).transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, **_):
    assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_q.diff().max()) <= max_seqlen_q
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        one = lambda t: t[start:end].transpose(0, 1)[None]  # noqa: E731  (1, H, S, D)
        out[start:end] = flash_attn_func(one(q).transpose(1, 2), one(k).transpose(1, 2), one(v).transpose(1, 2),
                                         dropout_p, softmax_scale, causal)[0]
    return out


class DotProductAttention(torch.nn.Module):
    MASKS = {"no_mask": None, "causal": False, "causal_bottom_right": True}  # -> bottom_right

    def __init__(self, num_attention_heads, kv_channels, attention_dropout=0.0, qkv_format="sbhd",
                 attn_mask_type="causal", softmax_scale=None, **_):
        super().__init__()
        assert attention_dropout == 0.0 and qkv_format == "bshd" and attn_mask_type in self.MASKS
        self.heads, self.dim, self.mask = num_attention_heads, kv_channels, attn_mask_type
        self.scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(kv_channels)

    def forward(self, query_layer, key_layer, value_layer):
        B, Sq, H, D = query_layer.shape
        assert (H, D) == (self.heads, self.dim)
        bottom_right = self.MASKS[self.mask]
        keep = None if bottom_right is None else causal_keep(Sq, key_layer.shape[1], bottom_right)
        bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
        out = reference(bhsd(query_layer), bhsd(key_layer), bhsd(value_layer), self.scale, keep)
        return out.transpose(1, 2).reshape(B, Sq, H * D)


def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6, **_):
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.float()
    return (x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps) * weight.float()).to(input.dtype)


def fused_layer_norm_affine(input, weight, bias, normalized_shape, eps=1e-6, **_):
    out = torch.nn.functional.layer_norm(input.float(), normalized_shape, weight.float(), bias.float(), eps)
    return out.to(input.dtype)


def install(monkeypatch) -> None:
    """Make `import flash_attn`, `from transformer_engine.pytorch import ...` and
    `from apex.normalization.fused_layer_norm import ...` find these."""
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func, flash.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    te, te_pytorch = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    te_pytorch.DotProductAttention, te.pytorch = DotProductAttention, te_pytorch
    apex, norm, fused = (types.ModuleType(n) for n in ("apex", "apex.normalization", "apex.normalization.fused_layer_norm"))
    fused.fused_rms_norm_affine, fused.fused_layer_norm_affine = fused_rms_norm_affine, fused_layer_norm_affine
    apex.normalization, norm.fused_layer_norm = norm, fused
    modules = {"flash_attn": flash, "transformer_engine": te, "transformer_engine.pytorch": te_pytorch,
               "apex": apex, "apex.normalization": norm, "apex.normalization.fused_layer_norm": fused}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
