"""Per-module learning rates, weight-decay exclusions, freezing and the LR schedule."""

import math

import pytest

from megatron_emu.arguments import parse_args
from megatron_emu.config import OptimizerConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.training.optim import LRScheduler, apply_freezing, build_optimizer, lr_factor, param_groups


def test_groups_follow_the_papers_per_module_rates_and_skip_decay_where_due():
    config = OptimizerConfig(lr=3e-5, lr_vision=4e-5, lr_causal_former=1e-4, weight_decay=0.05)
    model = build_emu(get_preset("tiny"), device="meta")
    names = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups(model, config):
        family = group["name"].split(".")[0]
        assert group["max_lr"] == {"llm": 3e-5, "vision": 4e-5, "causal_former": 1e-4}[family]
        for p in group["params"]:
            name = names[id(p)]
            no_decay = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "query_embeds", "relative_attention_bias"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    grouped = sum(len(g["params"]) for g in param_groups(model, config))
    assert grouped == len(list(model.parameters()))


def test_freezing_removes_a_module_from_the_optimizer():
    model = build_emu(get_preset("tiny"), seed=0)
    config = OptimizerConfig(freeze_vision=True)
    apply_freezing(model, config)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not any(p.requires_grad for p in model.ln_visual.parameters())
    optimizer = build_optimizer(model, config)
    assert all(not g["name"].startswith("vision") for g in optimizer.param_groups)


def test_warmup_then_cosine_to_min_lr():
    config = OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=10, lr_decay_style="cosine")
    assert lr_factor(0, config, 110) == pytest.approx(0.1)
    assert lr_factor(9, config, 110) == pytest.approx(1.0)
    assert lr_factor(60, config, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, config, 110) == pytest.approx(0.1)
    assert lr_factor(500, config, 110) == pytest.approx(0.1)


def test_scheduler_scales_every_group_from_its_own_peak():
    model = build_emu(get_preset("tiny"), seed=0)
    config = OptimizerConfig(lr=1e-3, lr_causal_former=2e-3, lr_warmup_iters=4)
    optimizer = build_optimizer(model, config)
    scheduler = LRScheduler(optimizer, config, train_iters=10)
    scheduler.step(1)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["max_lr"] * 0.5)


def test_unset_flags_take_the_presets_recipe_and_explicit_flags_win():
    paper = parse_args(["--preset", "emu-14b"])
    assert (paper.optimizer.lr, paper.optimizer.lr_vision, paper.optimizer.lr_causal_former) == (3e-5, 4e-5, 1e-4)
    assert paper.optimizer.lr_warmup_iters == 2000 and paper.train_iters == 10000
    assert (paper.optimizer.adam_beta1, paper.optimizer.adam_beta2, paper.optimizer.adam_eps) == (0.9, 0.98, 1e-6)
    assert paper.data.global_batch_size == 128 + 128 + 64 + 16 + 16
    assert parse_args(["--preset", "emu-14b", "--lr", "1e-4"]).optimizer.lr == 1e-4
