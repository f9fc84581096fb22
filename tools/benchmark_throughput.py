"""Training throughput of the real step (training/train.py) on synthetic batches.

    python tools/benchmark_throughput.py --preset tiny --micro-batch-size 4 --seq-length 160 \\
        --global-batch-size 4 --images-per-sample 1 --warmup-iters 2 --timed-iters 5 --compare hf
    torchrun --nproc-per-node 8 tools/benchmark_throughput.py --preset 1b --bf16 \\
        --tensor-model-parallel-size 2 ...
    python tools/benchmark_throughput.py --data-only [benchmark_data.py flags]
    python tools/benchmark_throughput.py --corpus-batches [--pack-sequences] ...   # loader batches

Every pretrain_emu.py flag applies (layout, --bf16, --recompute-*, --attention-backend, ...).
By default batches are random and full (`--images-per-sample` images, no padding);
`--corpus-batches` times the loader's real micro-batches of --data-path (default: the
synthetic corpus) instead, padded or, with --pack-sequences, packed: the same samples,
so samples/s compares the two layouts.
Reports tokens/s, samples/s, TFLOP/s per device (training/metrics.py formula), MFU
against the device peak (--peak-tflops to override; on CPU a measured matmul peak),
and peak memory per rank: CUDA allocator statistics on GPU, exact live tensor bytes on
CPU (metrics.CPUPeakMemory, over one extra untimed step). `--compare hf` trains the same
LLaMA shape with transformers' LlamaForCausalLM in the same run, on text-only batches
for both, and reports the tokens/s ratio (with --compile, both compiled, and against
transformers eager). `--profile-ops` / `--llm-shape`: tools/benchmark_ops.py.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_emu.arguments import build_parser, to_config  # noqa: E402
from megatron_emu.config import TrainConfig  # noqa: E402
from megatron_emu.data.random_batches import random_batch  # noqa: E402
from megatron_emu.training.metrics import CPUPeakMemory, device_peak_tflops, mfu, training_flops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_hf import freeze_weights, prepare_hf_llama  # noqa: E402
from benchmark_ops import add_ops_args, apply_llm_shape, profile_ops, run_eager, text_only_step  # noqa: E402

log = logging.getLogger("megatron_emu")


def add_benchmark_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--warmup-iters", type=int, default=2)
    g.add_argument("--timed-iters", type=int, default=5)
    g.add_argument("--images-per-sample", type=int, default=1)
    g.add_argument("--corpus-batches", action="store_true",
                   help="time the loader's micro-batches of --data-path (synthetic corpus by default)")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: table / CPU measurement)")
    g.add_argument("--compare", choices=["hf", "unpacked"], default=None,
                   help="hf: also train transformers' LlamaForCausalLM; unpacked (with --pack-sequences "
                        "--corpus-batches): also the same samples one per row")
    g.add_argument("--no-memory", action="store_true", help="skip the CPU memory-tracking step")
    g.add_argument("--data-only", action="store_true", help="run tools/benchmark_data.py with the other flags")
    g.add_argument("--measure-block-costs", metavar="FILE", default=None,
                   help="write per-block times at the run's shapes to FILE for --pipeline-balance-costs")
    g.add_argument("--stage-busy", action="store_true",
                   help="PP: even vs --pipeline-balance auto side by side, each rank's stage compute time")
    g.add_argument("--profile-comm", action="store_true",
                   help="DP: overlap vs --no-overlap-grad-reduce side by side, profiled time in collectives")


# -- timing ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()  # every run has a process group (one process: of one rank)


def time_steps(steps: list, warmup: int, timed: int, device: torch.device) -> list[float]:
    """Median seconds per step of each callable, after `warmup` untimed rounds.

    Compared steps run interleaved (ours, theirs, ours, ...) so both see the same
    machine load; the median discards steps hit by a neighbour's burst."""
    for _ in range(warmup):
        for step in steps:
            step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [[] for _ in steps]
    for _ in range(timed):
        for step, samples in zip(steps, times):
            start = time.perf_counter()
            step()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def peak_memory(step, state_tensors, device: torch.device, skip_cpu: bool) -> int | None:
    """Peak bytes this rank held: CUDA allocator stats, or one tracked step on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if skip_cpu:
        return None
    tracker = CPUPeakMemory()
    with tracker:
        tracker.track(state_tensors())  # weights, grads, optimizer states, batches
        step()
    return tracker.peak


# -- our step -----------------------------------------------------------------------
def corpus_microbatches(config: TrainConfig, world_size: int, dp_rank: int, dp_size: int, n_micro: int) -> list[dict]:
    """This rank's first step of real micro-batches, as pretraining would load them."""
    from megatron_emu.data.loader import build_pretrain_loader
    from megatron_emu.training.train import prepare_caches

    tokenizer = prepare_caches(config, world_size)
    loader = build_pretrain_loader(config.data, tokenizer, dp_rank=dp_rank, dp_size=dp_size, seed=config.seed,
                                   tokens_per_image=config.model.tokens_per_image)
    return [next(loader) for _ in range(n_micro)]


def global_counts(micro: list[dict], tp_pp: int) -> tuple[int, int]:
    """Rows and images of the global batch: summed over ranks, each DP replica counted once."""
    counts = torch.tensor([sum(b["tokens"].shape[0] for b in micro), sum(b["images"].shape[0] for b in micro)])
    dist.all_reduce(counts)  # the TP x PP ranks of one replica hold the same batches
    counts //= tp_pp
    return int(counts[0]), int(counts[1])


def prepare_emu(config: TrainConfig, images_per_sample: int, corpus: bool = False) -> dict:
    """Build this rank's model, optimizer and micro-batches as pretraining does (training/
    build.py's build_run, the one build path); returns the step to time."""
    from megatron_emu.training import train
    from megatron_emu.training.build import build_run

    run = build_run(config)
    dims, device, n_micro, d = run.dims, run.device, run.n_micro, config.data
    dp_rank = run.pmesh.dp_rank
    if corpus:
        micro = corpus_microbatches(config, dims.world_size, dp_rank, dims.dp, n_micro)
    else:
        micro = [random_batch(config.model, d.micro_batch_size, d.seq_length, images_per_sample, seed=dp_rank * 1000 + i)
                 for i in range(n_micro)]
    micro = [train.move_batch(b, device) for b in micro]
    rows, images = global_counts(micro, dims.tp * dims.pp)

    def step():
        train.train_step(run.pmodel, run.optimizer, micro, config, run.precision)

    def state():
        params = [p for part in run.pmodel.parts for p in part.parameters()]
        return params, [p.grad for p in params if p.grad is not None], run.optimizer.state_dict()["state"], micro

    perf = config.performance
    flops = training_flops(config.model, rows, d.seq_length, images, perf.recompute_granularity, perf.recompute_num_layers)
    return dict(step=step, state=state, flops=flops, device=device, world_size=dims.world_size, run=run,
                layout=dims.describe(), attention=run.attention, rows=rows, images=images)


# -- report -------------------------------------------------------------------------
def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}


def report(config: TrainConfig, args, ours: dict, peak: tuple[float, str], text_only_seconds, hf_seconds) -> dict:
    d, ws = config.data, ours["world_size"]
    tflops = ours["flops"] / ours["seconds"] / 1e12 / ws
    memories = [None] * ws
    dist.all_gather_object(memories, ours["memory"])
    row = {
        "preset": config.preset, "layout": ours["layout"], "world_size": ws, "device": device_name(ours["device"]),
        "precision": config.performance.compute_dtype, "attention": ours["attention"],
        "recompute": config.performance.recompute_granularity, "compile": config.performance.compile,
        "micro_batch_size": d.micro_batch_size, "global_batch_size": d.global_batch_size,
        "seq_length": d.seq_length, "batches": "corpus" if args.corpus_batches else "random",
        "images_per_sample": None if args.corpus_batches else args.images_per_sample,
        "pack_sequences": d.pack_sequences, "rows_per_step": ours["rows"], "images_per_step": ours["images"],
        "step_ms": ours["seconds"] * 1000, "tokens_per_s": ours["rows"] * d.seq_length / ours["seconds"],
        "samples_per_s": d.global_batch_size / ours["seconds"], "tflops_per_device": tflops,
        "peak_tflops": peak[0], "peak_source": peak[1], "mfu": mfu(tflops * 1e12, peak[0]),
        "peak_memory_mib_per_rank": [None if m is None else round(m / 2**20, 1) for m in memories],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "versions": versions(),
    }
    if hf_seconds is not None:
        ours_text = d.global_batch_size * d.seq_length / text_only_seconds
        hf_text = d.global_batch_size * d.seq_length / hf_seconds
        row.update(text_only_tokens_per_s=ours_text, hf_tokens_per_s=hf_text, ratio_vs_hf=ours_text / hf_text)
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(row: dict) -> None:
    skip = {"versions", "op_profile"}  # op_profile: printed by print_profile
    width = max(len(k) for k in row)
    for key, value in row.items():
        if key not in skip:
            shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
            print(f"  {key:<{width}}  {shown}")
    print("BENCHMARK_JSON " + json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    parser.description = __doc__.splitlines()[0]
    add_benchmark_args(parser)
    add_ops_args(parser)
    args, rest = parser.parse_known_args(argv)
    if args.data_only:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchmark_data import run_data_benchmark

        return run_data_benchmark(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config = apply_llm_shape(to_config(args), args)
    if args.measure_block_costs or args.stage_busy or args.profile_comm:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchmark_parallel import run_measure_mode

        return run_measure_mode(config, args)
    ours = prepare_emu(config, args.images_per_sample, args.corpus_batches)
    try:
        row = measure(config, args, ours)
        if ours["run"].pmesh.rank == 0:
            print_table(row)
    finally:
        ours["run"].close()  # a single process: its one-rank process group
    return row


def measure(config: TrainConfig, args, ours: dict) -> dict:
    """Time our step (and what --compare adds), measure memory; the report row."""
    device = ours["device"]
    steps = [ours["step"]]
    if args.compare == "hf":
        if ours["world_size"] != 1:
            raise ValueError("--compare hf runs on a single process")
        hf_step = prepare_hf_llama(config, device)
        steps += [text_only_step(config, ours), hf_step]  # text-only, both
        freeze_weights(ours["run"].optimizer, hf_step.optimizer)
        if config.performance.compile:  # and transformers eager: ours compiled vs both
            steps.append(run_eager(hf_step))
    if args.compare == "unpacked":
        if not (config.data.pack_sequences and args.corpus_batches):
            raise ValueError("--compare unpacked needs --pack-sequences and --corpus-batches")
        unpacked = dataclasses.replace(config, data=dataclasses.replace(config.data, pack_sequences=False))
        steps.append(prepare_emu(unpacked, 0, corpus=True)["step"])  # the same samples, one per row
    seconds = time_steps(steps, args.warmup_iters, args.timed_iters, device)
    ours.update(seconds=seconds[0], memory=peak_memory(ours["step"], ours["state"], device, args.no_memory))
    peak = device_peak_tflops(device, getattr(torch, config.performance.compute_dtype), args.peak_tflops)
    row = report(config, args, ours, peak, *(seconds[1:3] if args.compare == "hf" else (None, None)))
    if args.compare == "hf" and len(seconds) == 4:
        row.update(hf_eager_tokens_per_s=config.data.global_batch_size * config.data.seq_length / seconds[3],
                   ratio_vs_hf_eager=seconds[3] / seconds[1])
    if args.profile_ops:
        row.update(op_profile=profile_ops(args, steps, device))
    if args.compare == "unpacked":
        row.update(unpacked_step_ms=seconds[1] * 1000, packing_speedup=seconds[1] / seconds[0])
    return row


if __name__ == "__main__":
    main()
    from megatron_emu.cli import end_process_group

    end_process_group()  # on success only: an error exited above
