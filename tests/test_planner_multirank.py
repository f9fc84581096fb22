"""Planner on two gloo ranks (tiny, fp32, CPU): predicted peak memory per rank vs
measured, for DP=2 FSDP, DP=2 DDP and TP=2, in one spawn.

Measured like tests/test_planner.py (exact live tensor bytes over the second step),
with two corrections multi-rank training needs: parameters, gradients and Adam states
are DTensors, whose local shards are what a rank holds; and FSDP2 frees its gathered
parameters with storage.resize_(0), not by dropping the storage, so live bytes are
recounted from each storage's current size after every op (the stock tracker keeps
the size a storage had when it was first seen and reads gathered weights as never freed).
"""

from __future__ import annotations

import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

from megatron_emu.arguments import parse_args
from megatron_emu.data.random_batches import random_batch
from megatron_emu.parallel.mesh import ParallelDims, build_mesh
from megatron_emu.training import train
from megatron_emu.training.metrics import CPUPeakMemory
from megatron_emu.training.planner import Workload, estimate_memory, rank_parameters
from tests.dist_utils import spawn

LAYOUTS = {
    "dp2-fsdp": ["--data-parallel-sharding", "fsdp"],
    "dp2-ddp": ["--data-parallel-sharding", "ddp"],
    "tp2": ["--tensor-model-parallel-size", "2"],
}


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


class ResizeAwarePeak(CPUPeakMemory):
    """CPUPeakMemory counting DTensors by their local shard and storages by their size now."""

    def track(self, *tensors) -> None:
        super().track(*[local(t) for t in tree_flatten(list(tensors))[0]])

    def _add(self, storage) -> None:
        key = storage._cdata
        if key not in self._live:
            self._live[key] = weakref.ref(storage, lambda _, key=key: self._live.pop(key, None))
        self._recount()

    def _recount(self) -> None:
        storages = (ref() for ref in list(self._live.values()))
        self.current = sum(s.nbytes() for s in storages if s is not None)
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._recount()  # a resize_(0) inside FSDP2 shows up at the next op
        return out


def check_layout(rank: int, world: int, name: str, flags: list[str]) -> None:
    config = parse_args(["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-size", "4",
                         "--seq-length", "128", *flags])
    d, perf = config.data, config.performance
    dims = ParallelDims.from_config(config.parallel, world, config.model)
    n_micro = dims.validate(config.model, config.data)
    pmesh = build_mesh(dims, torch.device("cpu"))
    pmodel = train.build_model(config, pmesh, n_micro, torch.device("cpu"))
    optimizer = train.build_parallel_optimizer(pmodel, config.optimizer, perf.fused_kernels)
    params = [p for _, p in pmodel.named_parameters()]
    # Without DP every rank holds rank_parameters(); FSDP/DDP shard them afterwards.
    if dims.dp == 1:
        assert sum(local(p).numel() for p in params) == rank_parameters(config.model, dims, [0]), name
    micro = [random_batch(config.model, d.micro_batch_size, d.seq_length, 1, seed=10 * pmesh.dp_rank + i)
             for i in range(n_micro)]
    train.train_step(pmodel, optimizer, micro, config)  # creates the Adam states
    tracker = ResizeAwarePeak()
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
