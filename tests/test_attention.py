"""Attention backends: each equals the `math` reference (outputs and gradients)."""

import pytest
import torch

from megatron_emu.config import get_preset
from megatron_emu.model import attention
from megatron_emu.model.attention import (
    backend_installed,
    configure_attention,
    math_attention,
    resolve_attention_backend,
    scaled_dot_product_attention,
    set_attention_backend,
)
from megatron_emu.model.emu import build_emu
from tests.batches import random_batch

# (name, Sq, Sk, causal, with_bias, scale): every call pattern the model makes, plus
# the unequal-length causal case where SDPA's own is_causal would be top-left aligned.
CASES = [
    ("vit_self", 17, 17, False, False, None),
    ("llama_causal", 24, 24, True, False, None),
    ("t5_self_bias_unscaled", 8, 8, True, True, 1.0),
    ("t5_cross_unscaled", 8, 17, False, False, 1.0),
    ("causal_unequal", 5, 9, True, False, None),
    ("bias_scaled", 6, 6, False, True, 0.3),
]


@pytest.fixture(autouse=True)
def restore_backend():
    saved = attention.get_attention_backend()
    yield
    set_attention_backend(saved)


def make_inputs(sq, sk, with_bias, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda s: (2, 3, s, 16)  # noqa: E731  (B, H, S, D)
    q, k, v = (torch.randn(shape(s), generator=g).to(device, dtype).requires_grad_() for s in (sq, sk, sk))
    bias = torch.randn(1, 3, sq, sk, generator=g).to(device, dtype) if with_bias else None
    return q, k, v, bias


def run(backend, q, k, v, bias, causal, scale):
    set_attention_backend(backend)
    out = scaled_dot_product_attention(q, k, v, causal=causal, bias=bias, scale=scale)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out, grads


def check_against_math(backend, case, dtype=torch.float32, device="cpu", atol=1e-5):
    _, sq, sk, causal, with_bias, scale = case
    q, k, v, bias = make_inputs(sq, sk, with_bias, dtype, device)
    out, grads = run(backend, q, k, v, bias, causal, scale)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_grads = run("math", q32, k32, v32, None if bias is None else bias.float(), causal, scale)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=atol * 10, rtol=atol * 10)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sdpa_equals_math(case):
    check_against_math("sdpa", case)


def test_math_causal_mask_is_bottom_right():
    q, k, v, _ = make_inputs(2, 4, False)
    out = math_attention(q, k, v, causal=True)
    # Query 0 sees keys 0..2 only: changing key 3 must not change it; query 1 sees all.
    k2, v2 = k.detach().clone(), v.detach().clone()
    v2[:, :, 3] += 10.0
    out2 = math_attention(q, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, 0], out2[:, :, 0])
    assert not torch.allclose(out[:, :, 1], out2[:, :, 1])


def test_t5_bias_changes_the_output():
    """Guards against a backend silently dropping the additive bias."""
    q, k, v, bias = make_inputs(8, 8, True)
    set_attention_backend("sdpa")
    with_bias = scaled_dot_product_attention(q, k, v, causal=True, bias=bias, scale=1.0)
    without = scaled_dot_product_attention(q, k, v, causal=True, scale=1.0)
    assert (with_bias - without).abs().max() > 1e-2


def test_whole_model_same_with_sdpa_and_math():
    config = get_preset("tiny")
    model = build_emu(config, seed=0)
    batch = random_batch(config, batch_size=2, seq_length=64, images_per_sample=1, seed=1)
    outs = {}
    for backend in ("sdpa", "math"):
        set_attention_backend(backend)
        outs[backend] = model(batch["tokens"], batch["images"])
    for a, b in zip(outs["sdpa"], outs["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_resolves_to_an_installed_backend_and_logs(caplog):
    with caplog.at_level("INFO", logger="megatron_emu"):
        chosen = configure_attention("auto", "cpu")
    assert chosen == "sdpa"  # flash/te are CUDA-only
    assert attention.get_attention_backend() == "sdpa"
    assert "attention backend: sdpa" in caplog.text


@pytest.mark.parametrize(
    "name, device, flash_flag, message",
    [
        ("nonsense", "cpu", False, "unknown --attention-backend"),
        ("math", "cpu", True, "conflicts"),
        ("flash", "cpu", False, "flash-attn" if not backend_installed("flash") else "CUDA only"),
        ("te", "cpu", False, "transformer-engine" if not backend_installed("te") else "CUDA only"),
    ],
)
def test_bad_backend_flags_raise(name, device, flash_flag, message):
    with pytest.raises(ValueError, match=message):
        resolve_attention_backend(name, device, flash_flag)


def test_set_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("fast")


# -- GPU backends: run only where installed (the `[gpu]` extra on a CUDA machine) -------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("backend", ["sdpa", "flash", "te"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_backend_equals_math_bf16(backend, case):
    if not backend_installed(backend):
        pytest.skip(f"{backend} not installed")
    check_against_math(backend, case, dtype=torch.bfloat16, device="cuda", atol=2e-2)


# -- our calls into flash-attn / Transformer Engine, on CPU stand-ins of their contracts ---
@pytest.fixture
def stand_ins(monkeypatch):
    from tests import gpu_library_stand_ins

    gpu_library_stand_ins.install(monkeypatch)
    attention._te_modules.clear()
    yield
    attention._te_modules.clear()


# No bias (neither library takes one); te only with Sq == Sk (the dispatcher sends the rest to sdpa).
WRAPPER_CASES = [(w, c) for w in ("flash", "te") for c in CASES if not c[4] and (w == "flash" or c[1] == c[2])]


@pytest.mark.parametrize("wrapper, case", WRAPPER_CASES, ids=[f"{w}-{c[0]}" for w, c in WRAPPER_CASES])
def test_our_flash_and_te_calls_equal_math(stand_ins, wrapper, case):
    """The layout transposes, the causal alignment and the scale we hand each library."""
    _, sq, sk, causal, _, scale = case
    q, k, v, _ = make_inputs(sq, sk, False)
    call = attention.flash_attention if wrapper == "flash" else attention.te_attention
    out = call(q, k, v, causal=causal, scale=scale)
    ref = math_attention(q, k, v, causal=causal, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads, ref_grads = (torch.autograd.grad(o.square().sum(), (q, k, v)) for o in (out, ref))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_our_flash_varlen_call_equals_the_dense_document_mask(stand_ins):
    """Packed rows: cu_seqlens over the flattened tokens, one causal attention per document."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 3, 3, 3, 4, 4, 5]])
    q, k, v, _ = make_inputs(8, 8, False)
    cu_seqlens, longest = attention.document_boundaries(ids)
    assert cu_seqlens.tolist() == [0, 3, 5, 8, 13, 15, 16] and longest == 5
    documents = attention.DocumentMask(ids, None, cu_seqlens, longest)
    out = attention.flash_varlen_attention(q, k, v, documents)
    allowed = attention.dense_document_mask(ids)
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(out, math_attention(q, k, v, bias=bias), atol=1e-5, rtol=1e-5)
