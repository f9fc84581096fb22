"""Parity of every parallel layout with the single-process run (CPU, gloo, tiny, fp32).

Same seed, same weights, same micro-batches: the losses of each of 3 steps and the
(gathered) gradient of every parameter match the single-process reference within
rtol 1e-5. One spawn per world size runs all of its layouts (process groups and
imports are paid once), and the same spawn checks per-rank parameter bytes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_emu.config import DataConfig, OptimizerConfig, ParallelConfig, TrainConfig, get_preset
from megatron_emu.model.emu import build_emu
from megatron_emu.model.loss import emu_loss
from megatron_emu.parallel.mesh import ParallelDims, build_mesh
from megatron_emu.parallel.parallelize import parallelize_emu
from megatron_emu.training.optim import build_optimizer
from megatron_emu.training.train import build_parallel_optimizer, pipeline_loss_fn, train_step
from tests.batches import random_batch
from tests.dist_utils import spawn

STEPS, MICRO, SEQ, SEED = 3, 4, 80, 7  # 4 micro-batches of 1 sample per step (global batch 4)
RTOL = 1e-5


def run_config(**parallel) -> TrainConfig:
    return TrainConfig(
        preset="tiny",
        model=get_preset("tiny"),
        data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=MICRO),
        optimizer=OptimizerConfig(lr=1e-3, lr_decay_style="constant", weight_decay=0.01, clip_grad=1.0),
        parallel=ParallelConfig(**parallel),
        seed=SEED,
    )


def step_batches(config: TrainConfig) -> list[list[dict]]:
    """The micro-batches of each step; micro-batch m of step s is seeded by (s, m)."""
    return [[random_batch(config.model, 1, SEQ, 1, seed=100 * s + m) for m in range(MICRO)] for s in range(STEPS)]


def reference(config: TrainConfig) -> list[dict]:
    """Single process, written out plainly (not through the code under test)."""
    model = build_emu(config.model, seed=SEED)
    optimizer = build_optimizer(model, config.optimizer)
    special = config.model.special_tokens
    history = []
    for batches in step_batches(config):
        optimizer.zero_grad(set_to_none=True)
        lm = l2 = 0.0
        for b in batches:
            loss = emu_loss(*model(b["tokens"], b["images"]), b["tokens"], special, config.l2_loss_weight)
            (loss.total / len(batches)).backward()
            lm, l2 = lm + loss.lm.item() / len(batches), l2 + loss.l2.item() / len(batches)
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), config.optimizer.clip_grad).item()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        history.append(dict(lm=lm, l2=l2, norm=norm, grads=grads))
    return history


@pytest.fixture(scope="module")
def ref():
    return reference(run_config())


def full_grad(grad) -> torch.Tensor:
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def local_numel(param) -> int:
    return (param.to_local() if isinstance(param, DTensor) else param).numel()


def check_layout(rank: int, world: int, name: str, parallel: dict, ref: list[dict]) -> None:
    config = run_config(**parallel)
    dims = ParallelDims.from_config(config.parallel, world, config.model)
    n_micro = dims.validate(config.model, config.data)
    pmesh = build_mesh(dims, torch.device("cpu"))
    losses: list = []
    pmodel = parallelize_emu(build_emu(config.model, seed=SEED), pmesh, n_micro, pipeline_loss_fn(losses, config), SEED)
    pmodel.losses = losses
    optimizer = build_parallel_optimizer(pmodel, config.optimizer)
    seen = set()
    for step, batches in enumerate(step_batches(config)):
        mine = batches[pmesh.dp_rank * n_micro:(pmesh.dp_rank + 1) * n_micro]  # this DP rank's share
        result = train_step(pmodel, optimizer, mine, config)
        expect = ref[step]
        for key, got in (("lm", result.lm_loss), ("l2", result.l2_loss)):
            assert math.isclose(got, expect[key], rel_tol=RTOL), f"{name} step {step} {key}: {got} vs {expect[key]}"
        for pname, param in pmodel.named_parameters():
            got, want = full_grad(param.grad), expect["grads"][pname]
            torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item(),
                                       msg=lambda m: f"{name} step {step} grad {pname} (after clipping): {m}")
            seen.add(pname)
        norm = result.grad_norm
        assert math.isclose(norm, expect["norm"], rel_tol=RTOL), f"{name} step {step} grad norm: {norm} vs {expect['norm']}"
    check_coverage(name, seen, pmesh, ref)


def check_coverage(name: str, seen: set[str], pmesh, ref) -> None:
    """Across the pipeline ranks, every parameter was compared exactly once per stage."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(seen))
    union = set().union(*map(set, everyone))
    assert union == set(ref[0]["grads"]), f"{name}: parameters never compared: {set(ref[0]['grads']) - union}"


def check_bytes(rank: int, world: int, name: str, parallel: dict) -> None:
    """Per-rank parameter storage shrinks by TP on split layers, by stage under PP, by DP under FSDP."""
    config = run_config(**parallel)
    dims = ParallelDims.from_config(config.parallel, world, config.model)
    n_micro = dims.validate(config.model, config.data)
    full = build_emu(config.model, seed=SEED)
    sizes = {n: p.numel() for n, p in full.named_parameters()}
    pmodel = parallelize_emu(full, build_mesh(dims, torch.device("cpu")), n_micro, None, SEED)
    local = {n: local_numel(p) for n, p in pmodel.named_parameters()}
    layers = {n.split(".")[2] for n in local if n.startswith("llm.layers.")}
    assert len(layers) == sum(dims.stage_layers[s] for s in range(dims.num_stages)) // dims.pp if dims.pp > 1 else \
        len(layers) == config.model.llm.layers
    shards = dims.tp * dims.dp_shard  # dp_shard: DP under fsdp, 1 under ddp
    for pname in ("llm.layers.{}.attention.wq.weight", "llm.layers.{}.feed_forward.w2.weight"):
        n = pname.format(min(layers, key=int))
        assert local[n] == sizes[n] // shards, f"{name}: {n} holds {local[n]} of {sizes[n]} values, expected 1/{shards}"
    # What this rank's stages hold before TP/DP: LLaMA split over TP and the FSDP shard
    # group (slack: the norms TP leaves replicated), the vision side and heads at least
    # over the shard group (TP may leave the patch embedding, norms, queries whole).
    total, stage_total, held = sum(sizes.values()), sum(sizes[n] for n in local), sum(local.values())
    llm = sum(sizes[n] for n in local if n.startswith("llm."))
    bound = llm / shards * 1.05 + llm / 20 + (stage_total - llm) / dims.dp_shard * 1.05
    assert held <= bound, f"{name}: rank {rank} holds {held} of {stage_total} parameter values (bound {bound:.0f})"
    if dims.pp > 1:  # only stage 0 holds the vision side, only the last stage the heads
        first, last = any(n.startswith("visual.") for n in local), "llm.output.weight" in local
        assert (first, last) == (pmesh_rank_is(rank, world, dims, 0), pmesh_rank_is(rank, world, dims, dims.pp - 1)), name
        assert stage_total < total, f"{name}: rank {rank}'s stages hold all {total} parameter values"


def pmesh_rank_is(rank: int, world: int, dims: ParallelDims, pp_rank: int) -> bool:
    """Rank order is (pp, dp, tp), TP fastest: PP rank = rank // (DP x TP)."""
    return rank // (dims.dp * dims.tp) == pp_rank


WORLD2 = {
    "TP2": dict(tensor_model_parallel_size=2),
    "TP2+SP": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "PP2 1F1B": dict(pipeline_model_parallel_size=2),
    "PP2 interleaved": dict(pipeline_model_parallel_size=2, pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1),
    "PP2 zero-bubble": dict(pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble"),
    "DP2 DDP": dict(data_parallel_sharding="ddp"),
    "DP2 FSDP2": dict(data_parallel_sharding="fsdp"),
}
BYTES2 = {k: WORLD2[k] for k in ("TP2", "PP2 1F1B", "DP2 FSDP2", "DP2 DDP")}
# TP x PP (the layout whose stage hand-offs and TP collectives interact), sequence
# parallel under FSDP2, and hybrid sharding (2 replicas x 2 shards).
WORLD4 = {
    "TP2xPP2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    # 4 micro-batches per rank: enough for 4 virtual stages (not at DP2 on 8 ranks).
    "TP2+SP xPP2 interleaved": dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2,
                                    pipeline_schedule="interleaved", num_layers_per_virtual_pipeline_stage=1),
    "TP2+SP xDP2 FSDP2": dict(tensor_model_parallel_size=2, sequence_parallel=True, data_parallel_sharding="fsdp"),
    "DP4 HSDP 2x2": dict(data_parallel_sharding="hsdp", num_distributed_optimizer_instances=2),
}
BYTES4 = {k: WORLD4[k] for k in ("TP2xPP2", "DP4 HSDP 2x2")}
WORLD8 = {
    "TP2xPP2xDP2 FSDP2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 data_parallel_sharding="fsdp"),
    "TP2+SP xPP2 xDP2 FSDP2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                   pipeline_model_parallel_size=2, data_parallel_sharding="fsdp"),
    "TP2+SP xDP4 HSDP 2x2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                  data_parallel_sharding="hsdp", num_distributed_optimizer_instances=2),
}
BYTES8 = {k: WORLD8[k] for k in ("TP2xPP2xDP2 FSDP2",)}


def world_worker(rank: int, world: int, layouts: dict, bytes_layouts: dict, ref: list[dict]) -> None:
    for name, parallel in layouts.items():
        check_layout(rank, world, name, parallel, ref)
    for name, parallel in bytes_layouts.items():
        check_bytes(rank, world, name, parallel)


def test_two_ranks(ref):
    spawn(2, world_worker, WORLD2, BYTES2, ref)


def test_four_ranks(ref):
    spawn(4, world_worker, WORLD4, BYTES4, ref)


def test_eight_ranks(ref):
    spawn(8, world_worker, WORLD8, BYTES8, ref)
