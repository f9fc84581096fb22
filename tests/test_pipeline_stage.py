"""A pipeline stage is an Emu without the pieces other stages hold: chained, the stages
compute exactly Emu.forward (one process, no schedule)."""

import torch

from megatron_emu.config import get_preset
from megatron_emu.model.emu import Emu, build_emu
from megatron_emu.parallel.pipeline import MicrobatchFeed, split_stage
from tests.batches import random_batch


def test_stages_chained_equal_emu_forward():
    config = get_preset("tiny")
    full = build_emu(config, seed=3)
    feed = MicrobatchFeed()
    stages = [split_stage(full, s, (1, 2, 1), feed) for s in range(3)]
    assert all(isinstance(s, Emu) for s in stages)
    assert [(s.has_embed, s.has_head) for s in stages] == [(True, False), (False, False), (False, True)]
    assert [list(s.llm.layers) for s in stages] == [["0"], ["1", "2"], ["3"]]
    assert [sorted(s.transformer_stacks()) for s in stages] == [["causal_former", "llm", "vision"], ["llm"], ["llm"]]
    batch = random_batch(config, 2, 80, 1, seed=0)
    feed.microbatches = [batch]
    with torch.no_grad():
        out = stages[0](torch.tensor([0]))
        for stage in stages[1:]:
            out = stage(*out)
        want = full(batch["tokens"], batch["images"])
    logits, regression, targets, tokens = out
    torch.testing.assert_close(logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(regression, want.regression, rtol=0, atol=0)
    torch.testing.assert_close(targets, want.inputs, rtol=0, atol=0)
    assert torch.equal(tokens, batch["tokens"])
