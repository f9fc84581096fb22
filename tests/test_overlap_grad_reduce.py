"""Gradient reduction overlaps backward (Megatron's --overlap-grad-reduce, as FSDP2 does it).

Each transformer block is its own FSDP2 unit (parallel/data_parallel.py), so a block's
gradients are reduce-scattered (fsdp) or all-reduced (ddp) as soon as its backward is done,
while the blocks before it still compute theirs; with gradient accumulation only in the last
micro-batch (gradient_sync). This test observes the order on 2 gloo ranks: when LLaMA layer
0 starts its backward (it finishes last among the LLaMA layers), the reductions of all later
layers must already have been issued. A reduction issued after backward (one all-reduce
over the flat gradients, as a hand-written DP step would do) fails it.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from megatron_emu.config import ParallelConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.parallel.data_parallel import apply_data_parallel, gradient_sync
from megatron_emu.parallel.mesh import ParallelDims, build_mesh
from tests.batches import random_batch
from tests.dist_utils import spawn

MICRO_BATCHES = 2


def _observe(rank: int, world_size: int, sharding: str, per_block: bool = True) -> None:
    model_config = get_preset("tiny")
    dims = ParallelDims.from_config(ParallelConfig(data_parallel_sharding=sharding), world_size, model_config)
    model = build_emu(model_config, seed=0)
    apply_data_parallel(model, build_mesh(dims, torch.device("cpu")), per_block=per_block)
    layers = list(model.llm.layers.values())

    events: list[tuple[str, int]] = []  # (what, micro-batch)
    micro = [0]
    real_reduce = _fsdp_param_group.foreach_reduce

    def reduce(*args, **kwargs):
        events.append(("reduce", micro[0]))
        return real_reduce(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = reduce
    layers[0].register_full_backward_pre_hook(lambda *_: events.append(("layer 0 backward", micro[0])))
    try:
        for m in range(MICRO_BATCHES):
            micro[0] = m
            gradient_sync([model], enabled=m == MICRO_BATCHES - 1)
            b = random_batch(model_config, 1, 80, 1, seed=m + 10 * rank)
            out = model(b["tokens"], b["images"])
            (out.logits.float().pow(2).mean() + out.regression.float().pow(2).mean()).backward()
            events.append(("backward done", m))
    finally:
        _fsdp_param_group.foreach_reduce = real_reduce

    # Accumulating micro-batches reduce nothing.
    assert not [e for e in events if e == ("reduce", 0)], events
    last = [what for what, m in events if m == MICRO_BATCHES - 1]
    before_layer0 = last[: last.index("layer 0 backward")].count("reduce")
    if not per_block:  # --no-overlap-grad-reduce: one reduction, after the whole backward
        assert before_layer0 == 0 and last.count("reduce") == 1 and last[-2:] == ["reduce", "backward done"], last
        return
    # Every LLaMA layer after layer 0 has been reduced while layer 0 (and the vision side) still computes.
    assert before_layer0 >= len(layers) - 1, last
    # Everything else (layer 0, the vision blocks, the root's embeddings and heads) by the end of backward.
    assert last.count("reduce") >= len(layers) + 1 and last[-1] == "backward done", last
    for p in model.parameters():
        assert p.grad is not None


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_gradient_reductions_are_issued_during_backward(sharding):
    spawn(2, _observe, sharding)


def test_no_overlap_grad_reduce_reduces_after_backward():
    """The comparison setting of tools/benchmark_throughput.py --profile-comm."""
    spawn(2, _observe, "fsdp", False)


def _observe_pipeline(rank: int, world_size: int) -> None:
    """PP2 x DP2 FSDP2, 1F1B, 2 micro-batches per DP rank (parallel/pipeline.py OverlappedStage)."""
    from tests.test_parallel_parity import build_run, step_batches
    from megatron_emu.training.step import train_step

    config, pmodel, optimizer, pmesh, n_micro = build_run(
        world_size, dict(pipeline_model_parallel_size=2, data_parallel_sharding="fsdp"))
    (stage,) = pmodel.parts
    layers = list(stage.llm.layers.values())
    events: list[str] = []
    real_reduce = _fsdp_param_group.foreach_reduce

    def reduce(*args, **kwargs):
        events.append("reduce")
        return real_reduce(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = reduce
    layers[0].register_full_backward_pre_hook(lambda *_: events.append("first layer backward"))
    try:
        mine = step_batches(config)[0][pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]
        train_step(pmodel, optimizer, mine, config)
    finally:
        _fsdp_param_group.foreach_reduce = real_reduce
    starts = [i for i, e in enumerate(events) if e == "first layer backward"]
    assert len(starts) == n_micro == 2, events
    assert "reduce" not in events[:starts[0]], events  # nothing while accumulating
    # In the last micro-batch's backward, the stage's later layers are reduced before its
    # first layer starts: overlapped, not after the schedule.
    assert events[starts[0]:starts[1]].count("reduce") >= len(layers) - 1, (rank, events)
    assert events.count("reduce") >= len(layers) + 1, (rank, events)


def test_pipeline_stages_reduce_during_their_last_backward():
    spawn(4, _observe_pipeline)
