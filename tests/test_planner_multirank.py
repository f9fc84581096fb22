"""Planner on two gloo ranks (tiny, fp32, CPU): predicted peak memory per rank vs
measured, for DP=2 FSDP, DP=2 DDP, TP=2 and TP=2 with the images split across TP
(--vision-tensor-parallel images: ViT and Causal Former replicated, each rank encoding
half of the images), in one spawn.

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
from megatron_emu.parallel.planner import Workload, estimate_memory, rank_parameters, workload_placement
from tests.dist_utils import spawn

SHAPE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "128"]
# Images split across TP: 16 images per micro-batch, so that the encoders weigh in the total.
IMAGE_HEAVY = ["--micro-batch-size", "8", "--global-batch-size", "8", "--seq-length", "96"]
LAYOUTS = {  # name: (flags, images per sample)
    "dp2-fsdp": (SHAPE + ["--data-parallel-sharding", "fsdp"], 1),
    "dp2-ddp": (SHAPE + ["--data-parallel-sharding", "ddp"], 1),
    "tp2": (SHAPE + ["--tensor-model-parallel-size", "2"], 1),
    "tp2-heads-16-images": (IMAGE_HEAVY + ["--tensor-model-parallel-size", "2"], 2),
    "tp2-images-16-images": (IMAGE_HEAVY + ["--tensor-model-parallel-size", "2", "--vision-tensor-parallel", "images"],
                             2),
}


def check_layout(rank: int, world: int, name: str, flags: list[str], images_per_sample: int) -> tuple[int, int]:
    """(predicted, measured) peak bytes of this rank."""
    config = parse_args(["--preset", "tiny", "--pipeline-balance-images-per-sample", str(images_per_sample), *flags])
    d, perf = config.data, config.performance
    run = build_run(config)  # as pretraining builds it (training/build.py)
    dims, pmesh, n_micro, pmodel, optimizer = run.dims, run.pmesh, run.n_micro, run.pmodel, run.optimizer
    params = [p for _, p in pmodel.named_parameters()]
    work = Workload(d.micro_batch_size, d.global_batch_size, d.seq_length, images_per_sample, perf.compute_dtype,
                    perf.recompute_granularity, perf.recompute_num_layers, config.parallel.vision_tensor_parallel)
    # Without DP every rank holds rank_parameters(); FSDP/DDP shard them afterwards.
    if dims.dp == 1:
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        placement = workload_placement(config.model, work, dims)
        assert sum(p.numel() for p in local) == rank_parameters(config.model, dims, [0], placement), name
    micro = [random_batch(config.model, d.micro_batch_size, d.seq_length, images_per_sample,
                          seed=10 * pmesh.dp_rank + i) for i in range(n_micro)]
    train.train_step(pmodel, optimizer, micro, config)  # creates the Adam states
    tracker = CPUPeakMemory()
    with tracker:
        tracker.track(params, [p.grad for p in params if p.grad is not None], list(optimizer.state.values()), micro)
        train.train_step(pmodel, optimizer, micro, config)
    predicted = estimate_memory(config.model, work, dims).total
    error = (predicted - tracker.peak) / tracker.peak
    print(f"{name} rank {rank}: predicted {predicted / 2**20:.2f} MiB, measured {tracker.peak / 2**20:.2f} MiB")
    assert abs(error) < 0.10, f"{name} rank {rank}: predicted {predicted} vs measured {tracker.peak} ({error:+.1%})"
    return predicted, tracker.peak


def worker(rank: int, world: int) -> None:
    peaks = {name: check_layout(rank, world, name, flags, images_per_sample)
             for name, (flags, images_per_sample) in LAYOUTS.items()}
    # Splitting the images instead of the heads: full-width encoder blocks on half of the
    # images, replicated encoder weights, grads and Adam states. The planner must predict
    # what that saves (a planner blind to the placement predicts no change).
    (heads_p, heads_m), (images_p, images_m) = peaks["tp2-heads-16-images"], peaks["tp2-images-16-images"]
    predicted, measured = heads_p - images_p, heads_m - images_m
    assert measured > 2**20 and abs(predicted - measured) < 0.25 * measured, (predicted, measured)


def test_predicted_peak_memory_two_ranks_within_10_percent():
    spawn(2, worker)
