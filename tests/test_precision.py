"""Mixed precision, loss scaling, activation recompute, compile and fused kernels."""

import contextlib
import logging

import pytest
import torch
from torch import nn

from megatron_emu.config import OptimizerConfig, PerformanceConfig, get_preset
from megatron_emu.kernels import apply_fused_norms
from megatron_emu.training.optim import build_optimizer
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.model.norms import RMSNorm
from megatron_emu.parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile
from megatron_emu.training.metrics import CPUPeakMemory
from megatron_emu.training.precision import Precision
from tests.batches import random_batch

CONFIG = get_preset("tiny")
BATCH = random_batch(CONFIG, batch_size=2, seq_length=96, images_per_sample=1, seed=3)


def loss_and_grads(model, precision=None, measure=False):
    precision = precision or Precision(PerformanceConfig(), "cpu")
    tracker = CPUPeakMemory()
    with tracker if measure else contextlib.nullcontext():
        tracker.track(list(model.parameters()), BATCH)
        with precision.autocast():
            loss = emu_loss(*model(BATCH["tokens"], BATCH["images"]), BATCH["tokens"], CONFIG.special_tokens).total
        precision.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, tracker.peak


def test_recompute_keeps_loss_and_grads_and_saves_memory():
    ref_loss, ref_grads, ref_peak = loss_and_grads(build_emu(CONFIG, seed=0), measure=True)
    peaks = {}
    for granularity, num_layers in (("selective", None), ("full", None), ("full", 1)):
        model = build_emu(CONFIG, seed=0)
        wrapped = apply_activation_checkpointing(model, PerformanceConfig(
            recompute_granularity=granularity, recompute_num_layers=num_layers))
        expected = 1 if num_layers == 1 else None
        assert all(n == (expected or {"vision": 2, "causal_former": 2, "llm": 4}[k]) for k, n in wrapped.items())
        loss, grads, peaks[granularity, num_layers] = loss_and_grads(model, measure=True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        # Parameter names must survive (TP plans, optimizer groups, checkpoints key on them).
        assert set(grads) == set(ref_grads)
    assert peaks["full", None] < peaks["full", 1] < ref_peak
    assert peaks["selective", None] < ref_peak


def test_compile_after_recompute_keeps_outputs():
    ref = build_emu(CONFIG, seed=0)(BATCH["tokens"], BATCH["images"])
    model = build_emu(CONFIG, seed=0)
    apply_activation_checkpointing(model, PerformanceConfig(recompute_granularity="full"))
    # "eager" exercises dynamo's capture of every block without a C++ toolchain.
    assert apply_compile(model, backend="eager") == 8
    out = model(BATCH["tokens"], BATCH["images"])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_bf16_computes_in_bf16_with_fp32_master_weights_and_grads():
    ref_loss, _, _ = loss_and_grads(build_emu(CONFIG, seed=0))
    model = build_emu(CONFIG, seed=0)
    seen = []
    model.llm.layers["0"].feed_forward.w1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss, grads, _ = loss_and_grads(model, Precision(PerformanceConfig(bf16=True), "cpu"))
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)


def test_bf16_and_fp16_together_raise():
    with pytest.raises(ValueError, match="mutually exclusive"):
        PerformanceConfig(bf16=True, fp16=True)


@pytest.mark.parametrize("static_scale", [None, 1024.0])
def test_fp16_loss_scaling_skips_overflowing_steps(static_scale):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision(PerformanceConfig(fp16=True, loss_scale=static_scale, initial_loss_scale=2.0**10), "cpu")
    x = torch.randn(3, 4)

    precision.backward(model(x).square().sum())
    before = model.weight.detach().clone()
    model.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    precision.unscale_(optimizer)
    assert not precision.step(optimizer)
    torch.testing.assert_close(model.weight, before)
    assert precision.scaler.get_scale() == (static_scale or 2.0**9)

    optimizer.zero_grad()
    precision.backward(model(x).square().sum())
    # Gradients come back unscaled: equal to those of the unscaled loss.
    expected = torch.autograd.grad(model(x).square().sum(), model.weight)[0]
    precision.unscale_(optimizer)
    assert precision.step(optimizer) and not torch.equal(model.weight, before)
    torch.testing.assert_close(model.weight.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_reference(dtype):
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    ref = norm(x)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (x, norm.weight))
    assert apply_fused_norms(nn.Sequential(norm), "cpu") == "torch"
    assert norm.forward.__name__ != "forward"
    out = norm(x)
    grads = torch.autograd.grad(out.float().square().sum(), (x, norm.weight))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


def test_fused_adamw_equals_foreach():
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    models = [nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(models[0], config, fused=True), build_optimizer(models[1], config, fused=False)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    x = torch.randn(4, 8)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_after_recompute_stays_compiled_across_stacks_and_image_counts():
    """The three stacks share one checkpointed `forward` code object: micro-batches of
    varying image counts and an evaluation pass need more recompiles than dynamo's
    default budget (8), past which it runs eager (logged by torch._dynamo)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = build_emu(CONFIG, seed=0)
    apply_activation_checkpointing(model, PerformanceConfig(recompute_granularity="selective"))
    apply_compile(model, backend="eager")
    # torch's loggers do not propagate to the root logger (pytest's caplog): listen directly.
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        for i, images in enumerate((1, 2, 3, 1, 2)):
            batch = random_batch(CONFIG, batch_size=2, seq_length=160, images_per_sample=images, seed=i)
            model(batch["tokens"], batch["images"])[0].sum().backward()
        with torch.no_grad():  # an evaluation pass (training/evaluate.py) guards on grad mode
            model(batch["tokens"], batch["images"])
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "recompile_limit" in m], messages


def test_our_apex_norm_calls_equal_the_reference(monkeypatch):
    """apex's fused RMSNorm / LayerNorm as we call them (argument order, shapes, eps), on CPU
    stand-ins of apex's contract (tests/gpu_library_stand_ins.py)."""
    from megatron_emu import kernels
    from tests import gpu_library_stand_ins

    gpu_library_stand_ins.install(monkeypatch)
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object() if name == "apex" else None)
    rms, layer = RMSNorm(64, eps=1e-5), nn.LayerNorm(64, eps=1e-5)
    with torch.no_grad():
        for p in (rms.weight, layer.weight, layer.bias):
            p.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64)
    expected = [rms(x), layer(x)]
    assert apply_fused_norms(nn.Sequential(rms, layer), "cuda") == "apex"
    assert rms.forward.__name__ == "_apex_rms_norm_forward" and layer.forward.__name__ == "_apex_layer_norm_forward"
    for got, want in zip([rms(x), layer(x)], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
