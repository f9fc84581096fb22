"""What a training step no longer spends time on (issue 19, "the other 19%"): structural
checks on the ops the profiler sees, and that the numbers did not change.

No wall-clock here: the times are in BENCHMARKS.md (tools/benchmark_throughput.py
--profile-ops); these tests fail when a copy, a dtype round trip or a redundant op
comes back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile, record_function

from megatron_emu.config import LLaMAConfig, ParallelConfig, get_preset
from megatron_emu.kernels import apply_fused_norms
from megatron_emu.model.emu import build_emu
from megatron_emu.model.llama import apply_rotary, rotary_tables, token_positions
from megatron_emu.model.loss import cross_entropy_loss, text_labels
from megatron_emu.model.norms import RMSNorm
from megatron_emu.parallel.data_parallel import clip_grad_norm_global, squared_norm
from megatron_emu.parallel.mesh import ParallelDims, build_mesh

CONFIG = get_preset("tiny")
SPECIAL = CONFIG.special_tokens


def traced_ops(fn, record_shapes: bool = False) -> list:
    """The ops fn ran, as the profiler's events (name, input shapes)."""
    with profile(record_shapes=record_shapes) as prof:
        with record_function("traced"):
            fn()
    return [e for e in prof.events() if e.name.startswith(("aten::", "c10d::"))]


def names(events) -> set[str]:
    return {e.name for e in events}


# -- gradient norm ----------------------------------------------------------------------
def test_squared_norm_is_float64_exact_without_a_float64_copy():
    grads = [torch.randn(512, 300) * 1e-3, torch.randn(700), torch.randn(4, 8, 16), torch.tensor(2.0),
             torch.randn(0, 32)]
    for g in grads:
        want = g.double().pow(2).sum()
        got = squared_norm(g)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # each row rounded once in fp32
    big = torch.randn(256, 1024)
    ops = traced_ops(lambda: squared_norm(big), record_shapes=True)
    # Only the per-row norms (256 values) are converted; the (256, 1024) gradient is read once.
    copies = [e for e in ops if e.name in ("aten::_to_copy", "aten::copy_", "aten::pow")]
    assert all(list(e.input_shapes[0]) != [256, 1024] for e in copies), [(e.name, e.input_shapes) for e in copies]


def test_clip_grad_norm_on_one_process_needs_no_all_reduce():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    model(torch.randn(5, 32)).square().sum().backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    before = [p.grad.clone() for p in model.parameters()]
    dims = ParallelDims.from_config(ParallelConfig(), 1, CONFIG)
    pmesh = build_mesh(dims, torch.device("cpu"))
    try:
        ops = traced_ops(lambda: clip_grad_norm_global([model], want / 2, pmesh))
        norm = clip_grad_norm_global([model], 0.0, pmesh)  # 0: measure only, the grads are clipped now
    finally:
        pmesh.close()
    assert not any(n.startswith("c10d::") for n in names(ops))
    assert norm == pytest.approx(want / 2, rel=1e-5)  # clipped to max_norm by the first call
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g * (want / 2) / (want + 1e-6))


# -- RMSNorm ------------------------------------------------------------------------------
def test_fused_fp32_rms_norm_is_one_kernel_and_bit_identical():
    norm = RMSNorm(256)
    norm.weight.data = torch.randn(256)
    fused = RMSNorm(256)
    fused.weight.data = norm.weight.data.clone()
    apply_fused_norms(fused, "cpu")
    x = torch.randn(3, 40, 256, requires_grad=True)
    grad = torch.randn(3, 40, 256)
    out, fused_out = norm(x), fused(x)
    assert torch.equal(out, fused_out)
    want = torch.autograd.grad(out, (x, norm.weight), grad)
    got = torch.autograd.grad(fused_out, (x, fused.weight), grad)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # The scale runs inside torch's kernel, not as a separate op on its output.
    top_level = [e.name for e in traced_ops(lambda: fused(x)) if e.cpu_parent is not None
                 and e.cpu_parent.name == "traced"]
    assert top_level == ["aten::rms_norm"], top_level


def test_bf16_activations_keep_the_promoting_norm():
    """An fp32 weight on bf16 activations promotes, as RMSNorm.forward (and transformers) do."""
    fused = RMSNorm(64)
    apply_fused_norms(fused, "cpu")
    x = torch.randn(2, 5, 64).bfloat16()
    torch.testing.assert_close(fused(x), RMSNorm.forward(fused, x), rtol=0, atol=0)


# -- rotary -------------------------------------------------------------------------------
def rotate_half_reference(x, cos, sin):
    """transformers' apply_rotary_pos_emb on one tensor (unsigned sin)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_rotary_matches_rotate_half_bit_for_bit_without_a_negation():
    config = LLaMAConfig(hidden=64, heads=4, max_positions=32)
    cos, signed_sin = rotary_tables(config)
    half = config.head_dim // 2
    # The table's sin is signed: -sin on the first half, +sin on the second.
    assert torch.equal(signed_sin[:, :half], -signed_sin[:, half:])
    sin = torch.cat([signed_sin[:, half:], signed_sin[:, half:]], dim=-1)
    x = torch.randn(2, 4, 32, config.head_dim)
    assert torch.equal(apply_rotary(x, cos, signed_sin), rotate_half_reference(x, cos, sin))
    assert "aten::neg" not in names(traced_ops(lambda: apply_rotary(x, cos, signed_sin)))


def test_cos_sin_come_from_the_cached_table_every_step():
    model = build_emu(CONFIG, seed=0)
    block, seen = model.llm.layers["0"], []
    inner = block.forward
    block.forward = lambda x, positions: seen.append(positions) or inner(x, positions)
    tokens = torch.randint(3, SPECIAL.pad, (2, 24))
    for _ in range(2):
        model(tokens)
    assert len(seen) == 2
    table = model.llm.rope.untyped_storage().data_ptr()
    for positions in seen:  # views into the one buffer: nothing recomputed per step
        assert positions.cos.untyped_storage().data_ptr() == table
        assert positions.sin.untyped_storage().data_ptr() == table


# -- loss ---------------------------------------------------------------------------------
def sliced_cross_entropy(logits, tokens):
    """The loss as written before: the last position sliced off the logits."""
    labels = text_labels(tokens, SPECIAL)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def test_cross_entropy_reads_the_logits_in_place():
    B, S, V = 3, 50, CONFIG.llm.vocab_size
    tokens = torch.randint(3, SPECIAL.pad, (B, S))
    logits = torch.randn(B, S, V, requires_grad=True)
    loss = cross_entropy_loss(logits, tokens, SPECIAL, V)
    want = sliced_cross_entropy(logits, tokens)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    grad, = torch.autograd.grad(loss, logits)
    want_grad, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9)
    assert grad[:, -1].abs().max() == 0  # the last position has no target

    def step():
        torch.autograd.grad(cross_entropy_loss(logits, tokens, SPECIAL, V), logits)

    # No copy of the logits (forward) and no zero-filled logits-sized gradient (backward).
    sized = [e for e in traced_ops(step, record_shapes=True)
             if e.name in ("aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zeros", "aten::clone")
             and any(list(shape) in ([B, S, V], [B, S - 1, V], [B * (S - 1), V]) for shape in e.input_shapes)]
    assert not sized, [(e.name, e.input_shapes) for e in sized]


def test_padded_vocabulary_columns_still_take_no_probability():
    B, S, V = 2, 20, CONFIG.llm.vocab_size
    tokens = torch.randint(3, SPECIAL.pad, (B, S))
    logits = torch.randn(B, S, V + 6)
    want = sliced_cross_entropy(logits[..., :V], tokens)
    torch.testing.assert_close(cross_entropy_loss(logits, tokens, SPECIAL, V), want, rtol=1e-6, atol=0)
