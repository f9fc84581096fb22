"""The FLOPs formula against torch's FlopCounterMode on the tiny preset (within 2%)."""

import dataclasses

import pytest
from torch.utils.flop_counter import FlopCounterMode

from megatron_emu.config import PerformanceConfig, get_preset
from megatron_emu.model.attention import get_attention_backend, set_attention_backend
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.parallel.activation_checkpoint import apply_activation_checkpointing
from megatron_emu.training.metrics import forward_flops, mfu, training_flops
from tests.batches import random_batch

B, S, IMAGES_PER_SAMPLE = 2, 96, 2


@pytest.fixture(scope="module", autouse=True)
def math_attention():
    # FlopCounterMode has no entry for SDPA's CPU kernel; `math` runs it as bmm, which it counts.
    saved = get_attention_backend()
    set_attention_backend("math")
    yield
    set_attention_backend(saved)


def count_step(recompute=None, num_layers=None, train=True):
    config = get_preset("tiny")
    model = build_emu(config, seed=0)
    apply_activation_checkpointing(model, PerformanceConfig(recompute_granularity=recompute, recompute_num_layers=num_layers))
    batch = random_batch(config, B, S, IMAGES_PER_SAMPLE, seed=0)
    with FlopCounterMode(display=False) as counter:
        out = model(batch["tokens"], batch["images"])
        if train:
            emu_loss(*out, batch["tokens"], config.special_tokens).total.backward()
    return config, counter.get_total_flops()


@pytest.mark.parametrize("recompute, num_layers", [(None, None), ("selective", None), ("full", None), ("full", 1)])
def test_training_flops_match_flop_counter(recompute, num_layers):
    config, measured = count_step(recompute, num_layers)
    predicted = training_flops(config, B, S, B * IMAGES_PER_SAMPLE, recompute, num_layers)
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)


def test_forward_flops_match_flop_counter():
    config, measured = count_step(train=False)
    predicted = forward_flops(config, B, S, B * IMAGES_PER_SAMPLE)
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)


def test_every_stack_contributes():
    """Dropping any module family from the formula must break the 2% agreement."""
    config = get_preset("tiny")
    base = training_flops(config, B, S, B * IMAGES_PER_SAMPLE)
    for change in (dict(vision=dataclasses.replace(config.vision, layers=0)),
                   dict(causal_former=dataclasses.replace(config.causal_former, layers=0))):
        reduced = training_flops(dataclasses.replace(config, **change), B, S, B * IMAGES_PER_SAMPLE)
        assert (base - reduced) / base > 0.02
    assert training_flops(config, B, S, 0) < base  # images cost FLOPs


def test_recompute_adds_flops_in_order():
    config = get_preset("tiny")
    args = (config, B, S, B * IMAGES_PER_SAMPLE)
    none, sel, full1, full = (training_flops(*args, r, n) for r, n in
                              ((None, None), ("selective", None), ("full", 1), ("full", None)))
    assert none < sel < full and none < full1 < full


def test_mfu():
    assert mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert mfu(0.0, 312.0) == 0.0
