"""Scaled dot-product attention: the one place where the attention kernel is chosen.

Every attention module in the model (EVA ViT, Causal Former, LLaMA) calls
`scaled_dot_product_attention`. The backend is a process-wide setting so the model
code stays free of kernel choices; `--attention-backend` / `--use-flash-attn` set it
once at start-up through `configure_attention`.

Backends, fastest first (DESIGN.md decision 4):
  flash  flash-attn 2 (`flash_attn_func`), CUDA, fp16/bf16, no additive bias
  te     Transformer Engine `DotProductAttention`, CUDA, fp16/bf16, no additive bias
  sdpa   torch SDPA (flash / cuDNN / memory-efficient kernels on GPU, fused C++ on CPU)
  math   the reference softmax(q k^T * scale + bias) v, written out in torch ops
flash and te cannot add T5's relative position bias; those calls (only the 32-token
Causal Former self-attention) and fp32 calls run on sdpa instead, which is exact.

Causal masks are bottom-right aligned everywhere (query i sees key j <= i + Sk - Sq),
as flash-attn does; for Sq == Sk (every causal call in the model) this is the usual mask.

Packed rows (--pack-sequences): several documents share a row, and a token attends only
to earlier tokens of its own document. `document_mask` turns the (B, S) document ids into
what the backend needs, once per forward: flash-attn's varlen kernel takes the document
boundaries (cu_seqlens) of the flattened tokens and computes no cross-document scores;
sdpa and math take a dense (B, 1, S, S) boolean mask; te falls back to sdpa.
"""

import importlib.util
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger("megatron_emu")

BACKENDS = ("auto", "flash", "te", "sdpa", "math")
_backend = "sdpa"
_te_modules: dict = {}  # (heads, head_dim, scale, causal) -> te DotProductAttention


def backend_installed(name: str) -> bool:
    """Whether a backend's package is importable (flash/te) or built in (sdpa/math)."""
    if name == "flash":
        return importlib.util.find_spec("flash_attn") is not None
    if name == "te":
        return importlib.util.find_spec("transformer_engine") is not None
    return name in ("sdpa", "math")


def resolve_attention_backend(name: str, device_type: str, use_flash_attn: bool = False) -> str:
    """Flag value -> a concrete backend that runs on `device_type` ("cpu" / "cuda")."""
    if name not in BACKENDS:
        raise ValueError(f"unknown --attention-backend {name!r}; choose one of {BACKENDS}")
    if use_flash_attn:
        if name not in ("auto", "flash"):
            raise ValueError(f"--use-flash-attn conflicts with --attention-backend {name}")
        name = "flash"
    if name == "auto":
        gpu_first = ("flash", "te") if device_type == "cuda" else ()
        return next((b for b in gpu_first if backend_installed(b)), "sdpa")
    if name in ("flash", "te"):
        if not backend_installed(name):
            package = {"flash": "flash-attn", "te": "transformer-engine"}[name]
            raise ValueError(f"--attention-backend {name} needs the {package} package, which is not installed")
        if device_type != "cuda":
            raise ValueError(f"--attention-backend {name} runs on CUDA only, the device is {device_type}")
    return name


def configure_attention(name: str, device_type: str, use_flash_attn: bool = False) -> str:
    """Resolve the flags, set the process-wide backend and log the choice."""
    backend = resolve_attention_backend(name, device_type, use_flash_attn)
    set_attention_backend(backend)
    log.info("attention backend: %s (requested %s on %s)", backend, "flash" if use_flash_attn else name, device_type)
    return backend


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS[1:]:
        raise ValueError(f"unknown attention backend {name!r}; available: {BACKENDS[1:]}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


class DocumentMask(NamedTuple):
    """Which keys each query of a packed batch may see: earlier tokens of its document."""

    ids: torch.Tensor  # (B, S) document id of every token, constant within a document
    allowed: torch.Tensor | None  # (B, 1, S, S) bool, True = may attend (sdpa / math)
    cu_seqlens: torch.Tensor | None  # (num_documents + 1,) int32 starts in the flattened B*S tokens (flash)
    max_seqlen: int  # the longest document (flash); 0 when cu_seqlens is None


def document_mask(document_ids: torch.Tensor) -> DocumentMask:
    """(B, S) ids -> the mask in the form the current backend uses (built once per forward)."""
    if _backend == "flash" and document_ids.is_cuda:
        cu_seqlens, max_seqlen = document_boundaries(document_ids)
        return DocumentMask(document_ids, None, cu_seqlens, max_seqlen)
    return DocumentMask(document_ids, dense_document_mask(document_ids), None, 0)


def dense_document_mask(document_ids: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) bool
    S = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:  # (B, S) bool
    """True at the first token of every document (every row starts one)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_boundaries(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn varlen's cu_seqlens over the flattened (B*S) tokens, and the longest document."""
    starts = document_starts(document_ids).flatten().nonzero().flatten()  # (num_documents,)
    total = torch.tensor([document_ids.numel()], device=document_ids.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def scaled_dot_product_attention(
    q: torch.Tensor,  # (B, H, Sq, D)
    k: torch.Tensor,  # (B, H, Sk, D)
    v: torch.Tensor,  # (B, H, Sk, D)
    *,
    causal: bool = False,
    bias: torch.Tensor | None = None,  # additive, broadcastable to (B, H, Sq, Sk)
    scale: float | None = None,  # None = 1/sqrt(D); T5 passes 1.0
    documents: DocumentMask | None = None,  # packed rows: causal within each document
) -> torch.Tensor:  # (B, H, Sq, D)
    if documents is not None:
        return document_attention(q, k, v, documents, scale)
    if _backend == "math":
        return math_attention(q, k, v, causal=causal, bias=bias, scale=scale)
    fused_ok = bias is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if _backend == "flash" and fused_ok:
        return flash_attention(q, k, v, causal=causal, scale=scale)
    if _backend == "te" and fused_ok and q.shape[-2] == k.shape[-2]:
        return te_attention(q, k, v, causal=causal, scale=scale)
    return sdpa_attention(q, k, v, causal=causal, bias=bias, scale=scale)


def document_attention(q, k, v, documents: DocumentMask, scale=None):
    """Causal self-attention of packed rows, each token within its own document."""
    fused_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if _backend == "flash" and fused_ok and documents.cu_seqlens is not None:
        return flash_varlen_attention(q, k, v, documents, scale)
    allowed = documents.allowed
    if allowed is None:  # built for flash, but this call (fp32) runs elsewhere
        allowed = dense_document_mask(documents.ids)
    if _backend == "math":
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        return math_attention(q, k, v, bias=bias, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def sdpa_attention(q, k, v, *, causal=False, bias=None, scale=None):
    """torch SDPA. It takes either a mask or is_causal (top-left aligned), so a causal
    call with a bias, or with Sq != Sk, folds causality into the additive mask."""
    if causal and (bias is not None or q.shape[-2] != k.shape[-2]):
        mask = causal_bias(q.shape[-2], k.shape[-2], q.dtype, q.device)  # (Sq, Sk)
        bias = mask if bias is None else bias + mask
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, scale=scale)


def flash_attention(q, k, v, *, causal=False, scale=None):
    """flash-attn 2 wants (B, S, H, D); its causal mask is bottom-right aligned (>= 2.1)."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale)
    return out.transpose(1, 2)  # (B, H, Sq, D)


def flash_varlen_attention(q, k, v, documents: DocumentMask, scale=None):
    """flash-attn 2's varlen kernel on the flattened tokens: one causal attention per
    document, no scores computed across documents."""
    from flash_attn import flash_attn_varlen_func

    B, H, S, D = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(B * S, -1, D)  # noqa: E731  (B*S, H, D)
    cu, longest = documents.cu_seqlens, documents.max_seqlen
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, longest, longest, causal=True, softmax_scale=scale)
    return out.view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)


def te_attention(q, k, v, *, causal=False, scale=None):
    """Transformer Engine's fused attention (cuDNN / flash inside), layout "bshd"."""
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    key = (H, D, scale, causal)
    if key not in _te_modules:
        from transformer_engine.pytorch import DotProductAttention

        _te_modules[key] = DotProductAttention(
            H, D, attention_dropout=0.0, qkv_format="bshd",
            attn_mask_type="causal" if causal else "no_mask", softmax_scale=scale,
        )
    out = _te_modules[key](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, S, H*D)
    return out.view(B, S, H, D).transpose(1, 2)


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
