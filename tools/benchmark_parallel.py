"""Measurement modes of tools/benchmark_throughput.py beyond the step time.

    --measure-block-costs FILE   per-block times for --pipeline-balance-costs (benchmark_blocks.py)
    --stage-busy                 PP: even vs --pipeline-balance auto (and auto from the costs file
                                 when --pipeline-balance-costs is given), each rank's busy time
    --profile-comm               DP: per-block FSDP2 units (overlap) vs --no-overlap-grad-reduce,
                                 time in collectives from a torch.profiler trace (comm_trace.py:
                                 gloo's CPU threads, or NCCL kernels on GPU)

The layouts compared are built side by side in one process group and stepped in turn,
round after round, so they share the machine's load; every figure is a median over rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from megatron_emu.config import TrainConfig


def run_measure_mode(config: TrainConfig, args) -> dict:
    if args.measure_block_costs:
        from benchmark_blocks import measure_block_costs

        device = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
        row = measure_block_costs(config, args.images_per_sample, args.measure_block_costs, args.warmup_iters,
                                  args.timed_iters, device)
        print("BLOCK_COSTS_JSON " + json.dumps(row), flush=True)
        return row
    variants = stage_busy_variants(config) if args.stage_busy else comm_variants(config)
    built = build_variants(variants, args.images_per_sample)
    try:
        measured = measure_variants(built, args)
        rows = gather_rows(built, measured)
        row = {"mode": "stage-busy" if args.stage_busy else "profile-comm", "variants": rows,
               "load_average": list(load_average()), "threads": torch.get_num_threads(),
               "rounds": args.timed_iters, "torch": torch.__version__}
        if dist.get_rank() == 0:
            print_variants(row)
    finally:
        for b in built.values():
            b["run"].close()
    return row


# -- the layouts compared ------------------------------------------------------------------
def stage_busy_variants(config: TrainConfig) -> dict[str, TrainConfig]:
    p = config.parallel
    if p.pipeline_model_parallel_size < 2:
        raise ValueError("--stage-busy compares pipeline splits: give --pipeline-model-parallel-size > 1")
    variants = {"even": dataclasses.replace(p, pipeline_balance="even", pipeline_balance_costs=""),
                "auto (FLOPs)": dataclasses.replace(p, pipeline_balance="auto", pipeline_balance_costs="")}
    if p.pipeline_balance_costs:
        variants["auto (measured)"] = dataclasses.replace(p, pipeline_balance="auto")
    configs = {name: dataclasses.replace(config, parallel=parallel) for name, parallel in variants.items()}
    return drop_repeated_splits(configs)


def drop_repeated_splits(configs: dict[str, TrainConfig]) -> dict[str, TrainConfig]:
    """One variant per distinct split (auto may agree with even, or measured with FLOPs)."""
    from megatron_emu.parallel.mesh import ParallelDims

    seen, kept = {}, {}
    for name, config in configs.items():
        dims = ParallelDims.from_config(config.parallel, int(os.environ.get("WORLD_SIZE", "1")), config.model,
                                        config.data.seq_length)
        if dims.stage_layers in seen:
            if os.environ.get("RANK", "0") == "0":
                print(f"{name}: the split of {seen[dims.stage_layers]}, {list(dims.stage_layers)}: not repeated")
            continue
        seen[dims.stage_layers], kept[name] = name, config
    return kept


def comm_variants(config: TrainConfig) -> dict[str, TrainConfig]:
    p = config.parallel
    return {name: dataclasses.replace(config, parallel=dataclasses.replace(p, overlap_grad_reduce=overlap))
            for name, overlap in (("overlap (per block)", True), ("no overlap (one unit)", False))}


def build_variants(variants: dict[str, TrainConfig], images_per_sample: int) -> dict[str, dict]:
    from benchmark_throughput import prepare_emu

    built = {name: prepare_emu(config, images_per_sample) for name, config in variants.items()}
    if built[next(iter(built))]["world_size"] < 2:
        for b in built.values():
            b["run"].close()
        raise ValueError("--stage-busy / --profile-comm need several ranks: start with torchrun --nproc-per-node 2")
    return built


# -- measuring -----------------------------------------------------------------------------
class BusyTimer:
    """Seconds this rank spends inside the wrapped calls (its stages' compute): wall time,
    and the main thread's CPU time, which on a shared CPU leaves out the time the rank was
    descheduled (with one intra-op thread, CPU forward and backward run on this thread)."""

    def __init__(self, device: torch.device):
        self.seconds, self.cpu_seconds, self.device = 0.0, 0.0, device

    def reset(self) -> None:
        self.seconds, self.cpu_seconds = 0.0, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.seconds += time.perf_counter() - start
                self.cpu_seconds += time.thread_time() - cpu
        return timed


def attach_busy_timer(run) -> BusyTimer:
    """Wrap each pipeline stage's forward and backward (torch.distributed.pipelining calls
    them between its sends and receives, so pipeline waits fall outside) and the loss."""
    timer = BusyTimer(run.device)
    schedule = run.pmodel.schedule.schedule
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        stage.forward_maybe_with_nosync = timer.wrap(stage.forward_maybe_with_nosync)
        stage.backward_maybe_with_nosync = timer.wrap(stage.backward_maybe_with_nosync)
    schedule._loss_fn = timer.wrap(schedule._loss_fn)
    return timer


def measure_variants(built: dict[str, dict], args) -> dict[str, dict]:
    """Per variant, this rank's medians: step seconds and busy seconds (--stage-busy) or the
    collective seconds of a profiled step (--profile-comm)."""
    from benchmark_throughput import synchronize

    for _ in range(max(args.warmup_iters, 1)):  # the first step also builds the pipeline schedules
        for b in built.values():
            b["step"]()
    timers = {name: attach_busy_timer(b["run"]) for name, b in built.items()} if args.stage_busy else {}
    samples = {name: {"step_s": [], "busy_s": [], "busy_cpu_s": []} for name in built}
    for _ in range(args.timed_iters):
        for name, b in built.items():
            device = b["device"]
            synchronize(device)
            if name in timers:
                timers[name].reset()
            start = time.perf_counter()
            b["step"]()
            synchronize(device)
            samples[name]["step_s"].append(time.perf_counter() - start)
            if name in timers:
                samples[name]["busy_s"].append(timers[name].seconds)
                samples[name]["busy_cpu_s"].append(timers[name].cpu_seconds)
    if args.profile_comm:
        profile_rounds(built, samples, args.timed_iters)
    return {name: {k: statistics.median(v) for k, v in s.items() if v} for name, s in samples.items()}


def profile_rounds(built: dict[str, dict], samples: dict[str, dict], rounds: int) -> None:
    """Profiled single steps, the variants in turn as above; traces read after the last."""
    from comm_trace import comm_times, profiled_step

    traces = {name: [] for name in built}
    for _ in range(rounds):
        for name, b in built.items():
            prof, seconds = profiled_step(b["step"], b["device"])
            traces[name].append(prof)
            samples[name].setdefault("profiled_step_s", []).append(seconds)
    for name, profs in traces.items():
        for prof in profs:
            for key, value in comm_times(prof.events()).items():
                samples[name].setdefault(key, []).append(value)


def gather_rows(built: dict[str, dict], measured: dict[str, dict]) -> list[dict]:
    """One row per variant with every rank's figures (ms), on rank 0."""
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, measured)
    rows = []
    for name, b in built.items():
        dims = b["run"].dims
        per_rank = [dict(in_ms(k, v) for k, v in r[name].items()) for r in ranks]
        row = {"variant": name, "layout": dims.describe(),
               "step_ms": statistics.median(r["step_ms"] for r in per_rank), "per_rank_ms": per_rank}
        if dims.pp > 1:
            row["stage_layers"] = list(dims.stage_layers)
        rows.append(row)
    return rows


def in_ms(key: str, value: float) -> tuple[str, float]:
    """("busy_s", 0.25) -> ("busy_ms", 250.0); counts unchanged."""
    return (key.removesuffix("_s") + "_ms", round(value * 1000, 2)) if key.endswith("_s") else (key, value)


# -- report --------------------------------------------------------------------------------
def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def print_variants(row: dict) -> None:
    for v in row["variants"]:
        print(f"{v['variant']:<24} {v['layout']}")
        print(f"  step {v['step_ms']:.1f} ms (median over {row['rounds']} rounds)")
        for rank, r in enumerate(v["per_rank_ms"]):
            print("  rank %d: %s" % (rank, ", ".join(f"{k} {x:.1f}" for k, x in r.items())))
    print(f"load average {row['load_average']}, {row['threads']} threads per rank")
    print("BENCHMARK_JSON " + json.dumps(row), flush=True)



if __name__ == "__main__":  # a module of tools/benchmark_throughput.py, not a tool of its own
    from megatron_emu.cli import refuse_run_as_tool

    refuse_run_as_tool(__file__, "--measure-block-costs FILE | --stage-busy | --profile-comm",
                       "python -m torch.distributed.run --nproc-per-node 2 tools/benchmark_throughput.py --pipeline-model-parallel-size 2 --stage-busy")
