"""Planner on two gloo ranks (tiny, fp32, CPU): predicted peak memory per rank vs
measured, for DP=2 FSDP, DP=2 DDP and TP=2, in one spawn.

Measured like tests/test_planner.py (exact live tensor bytes over the second step, with
CPUPeakMemory, which counts a DTensor as its local shard and sees FSDP2's in-place frees).
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from megatron_emu.arguments import parse_args
from megatron_emu.data.random_batches import random_batch
from megatron_emu.training import train
from megatron_emu.training.build import build_run
from megatron_emu.training.metrics import CPUPeakMemory
from megatron_emu.parallel.planner import Workload, estimate_memory, rank_parameters
from tests.dist_utils import spawn

LAYOUTS = {
    "dp2-fsdp": ["--data-parallel-sharding", "fsdp"],
    "dp2-ddp": ["--data-parallel-sharding", "ddp"],
    "tp2": ["--tensor-model-parallel-size", "2"],
}


def check_layout(rank: int, world: int, name: str, flags: list[str]) -> None:
    config = parse_args(["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "4",
                         "--seq-length", "128", *flags])
    d, perf = config.data, config.performance
    run = build_run(config)  # as pretraining builds it (training/build.py)
    dims, pmesh, n_micro, pmodel, optimizer = run.dims, run.pmesh, run.n_micro, run.pmodel, run.optimizer
    params = [p for _, p in pmodel.named_parameters()]
    # Without DP every rank holds rank_parameters(); FSDP/DDP shard them afterwards.
    if dims.dp == 1:
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        assert sum(p.numel() for p in local) == rank_parameters(config.model, dims, [0]), name
    micro = [random_batch(config.model, d.micro_batch_size, d.seq_length, 1, seed=10 * pmesh.dp_rank + i)
             for i in range(n_micro)]
    train.train_step(pmodel, optimizer, micro, config)  # creates the Adam states
    tracker = CPUPeakMemory()
    with tracker:
        tracker.track(params, [p.grad for p in params if p.grad is not None], list(optimizer.state.values()), micro)
        train.train_step(pmodel, optimizer, micro, config)
    work = Workload(d.micro_batch_size, d.global_batch_size, d.seq_length, 1, perf.compute_dtype,
                    perf.recompute_granularity, perf.recompute_num_layers)
    predicted = estimate_memory(config.model, work, dims).total
    error = (predicted - tracker.peak) / tracker.peak
    assert abs(error) < 0.10, f"{name} rank {rank}: predicted {predicted} vs measured {tracker.peak} ({error:+.1%})"


def worker(rank: int, world: int) -> None:
    for name, flags in LAYOUTS.items():
        check_layout(rank, world, name, flags)


def test_predicted_peak_memory_two_ranks_within_10_percent():
    spawn(2, worker)
