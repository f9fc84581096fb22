"""Per-parameter initialisation (model/init.py): rules, and values that depend only on
(seed, parameter name). The sharded, meta-device path is checked on 2/4/8 gloo ranks in
tests/test_parallel_parity.py (check_meta_init)."""

import pytest
import torch
from torch import nn

from megatron_emu.config import get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.init import NORMAL, ONES, ZEROS, init_parameters, init_plan

CONFIG = get_preset("tiny")


def test_every_parameter_has_the_spec_rule():
    model = build_emu(CONFIG, seed=0)
    std, c = CONFIG.init_std, CONFIG.causal_former
    plan = init_plan(model, std)
    assert set(plan) == {n for n, _ in model.named_parameters()}
    assert plan["llm.layers.0.attention.wq.weight"] == (NORMAL, std)
    assert plan["llm.norm.weight"] == (ONES, 0.0) and plan["ln_visual.bias"] == (ZEROS, 0.0)
    assert plan["visual.pos_embed"] == (NORMAL, std)
    assert plan["causal_former.blocks.0.cross_attn.q.weight"] == (NORMAL, (c.d_model * c.head_dim) ** -0.5)
    params = dict(model.named_parameters())
    w = params["llm.layers.0.feed_forward.w1.weight"]
    assert abs(w.std().item() - std) < 0.05 * std and abs(w.mean().item()) < 0.05 * std
    assert torch.equal(params["llm.norm.weight"], torch.ones_like(params["llm.norm.weight"]))
    assert not params["ln_visual.bias"].any()


def test_values_depend_only_on_seed_and_name():
    a, b, c = build_emu(CONFIG, seed=3), build_emu(CONFIG, seed=3), build_emu(CONFIG, seed=4)
    wq = "llm.layers.1.attention.wq.weight"
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa[wq], pc[wq])
    assert not torch.equal(pa[wq], pa["llm.layers.0.attention.wq.weight"])  # no two layers alike
    # One parameter on its own, in any order, gets the same values.
    with torch.no_grad():
        pb[wq].zero_()
    init_parameters(b, CONFIG.init_std, 3, names={wq})
    assert torch.equal(pb[wq], pa[wq])


def test_a_parameter_without_a_rule_is_refused():
    model = build_emu(CONFIG, seed=0)
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="extra: no initialisation rule"):
        init_parameters(model, CONFIG.init_std, 0)
