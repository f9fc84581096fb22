"""Where a training step's time goes, ours vs transformers: tools/benchmark_throughput.py's
`--profile-ops` and `--llm-shape` (issue 19, "the other 19%").

    OMP_NUM_THREADS=1 python tools/benchmark_throughput.py --preset tiny --micro-batch-size 1 \\
        --global-batch-size 1 --seq-length 256 --llm-shape 1b --llm-layers 2 --compare hf --profile-ops

`--profile-ops` runs --profile-steps extra steps (interleaved, per-op medians) of each compared side (our text-only step and
LlamaForCausalLM, same shape, same batch) under torch.profiler and reports the share of
the step spent in matmuls: self time in aten::mm / addmm / bmm / matmul / linear
(and their out= variants) over the self time of every op. Self time is CPU time on CPU
and, on GPU, the time of the kernels each op launched itself (the CUDA activity). Attention's fused kernel
(SDPA) is counted apart, as it is neither a plain matmul nor overhead. The largest other
ops are listed, which is where a step can still lose time.

`--llm-shape PRESET` takes the LLaMA widths (hidden, heads, FFN, vocabulary) of another
preset, so the 1b widths run on CPU with the tiny vision side; `--llm-layers N` sets the
number of LLaMA layers (fewer layers keep a 1b-width step within a CPU budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_emu.data.random_batches import random_batch

MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                        "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot"})
# Fused attention kernels (and their backward), reported apart from the plain matmuls.
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::scaled_dot_product")


def add_ops_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("op profile (issue 19)")
    g.add_argument("--profile-ops", action="store_true",
                   help="profile one step of each compared side: matmul share of the step, top other ops")
    g.add_argument("--profile-top", type=int, default=8, help="other ops listed per side (default 8)")
    g.add_argument("--profile-steps", type=int, default=3, help="profiled steps per side, interleaved (default 3)")
    g.add_argument("--llm-shape", default=None, metavar="PRESET",
                   help="LLaMA widths (hidden, heads, FFN, vocabulary) of this preset on --preset's vision side")
    g.add_argument("--llm-layers", type=int, default=None, help="number of LLaMA layers (default: the preset's)")


def apply_llm_shape(config, args):
    """The TrainConfig with --llm-shape / --llm-layers applied (unchanged without them)."""
    from megatron_emu.config import get_preset

    llm = config.model.llm
    if args.llm_shape is not None:
        widths = get_preset(args.llm_shape).llm
        llm = dataclasses.replace(llm, hidden=widths.hidden, heads=widths.heads, ffn_dim=widths.ffn_dim,
                                  base_vocab_size=widths.base_vocab_size,
                                  max_positions=max(llm.max_positions, widths.max_positions))
    if args.llm_layers is not None:
        if args.llm_layers < 1:
            raise ValueError(f"--llm-layers must be >= 1, got {args.llm_layers}")
        llm = dataclasses.replace(llm, layers=args.llm_layers)
    if llm is config.model.llm:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, llm=llm))


def op_times(step, device: torch.device) -> tuple[dict[str, float], float]:
    """Self microseconds of every op over one profiled call of `step`, and its wall time (s):
    CPU time on CPU; on GPU the time of the kernels each op launched (the host only queues)."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    self_time = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return {event.key: getattr(event, self_time) for event in prof.key_averages()}, wall


def median_op_times(runs: list[tuple[dict[str, float], float]]) -> tuple[dict[str, float], float]:
    """Per op, the median over the profiled steps (a neighbour's burst hits one step, not all)."""
    names = set().union(*(times for times, _ in runs))
    times = {name: statistics.median(t.get(name, 0.0) for t, _ in runs) for name in names}
    return times, statistics.median(wall for _, wall in runs)


def op_share(times: dict[str, float], wall: float, top: int) -> dict:
    """Matmul and attention shares of the ops' self time; the largest other ops."""
    total = sum(times.values())
    matmul = sum(t for name, t in times.items() if name in MATMUL_OPS)
    attention = sum(t for name, t in times.items() if name.startswith(ATTENTION_PREFIXES))
    others = sorted(((t, name) for name, t in times.items()
                     if name not in MATMUL_OPS and not name.startswith(ATTENTION_PREFIXES)), reverse=True)
    return {
        "ops_ms": total / 1e3, "wall_ms": wall * 1e3,
        "matmul_share": matmul / total if total else 0.0,
        "matmul_share_of_wall": matmul / 1e6 / wall,
        "attention_share": attention / total if total else 0.0,
        "top_other_ops": [(name, round(t / total, 4)) for t, name in others[:top]],
    }


def profile_sides(sides: dict[str, callable], top: int, steps: int = 3,
                  device: torch.device = torch.device("cpu")) -> dict[str, dict]:
    """Profile `steps` steps of each side, interleaved (after the timed steps: warm); the
    shares are of the per-op medians."""
    runs = {name: [] for name in sides}
    for _ in range(steps):
        for name, step in sides.items():
            runs[name].append(op_times(step, device))
    return {name: op_share(*median_op_times(runs[name]), top) for name in sides}


def print_profile(profiles: dict[str, dict]) -> None:
    for name, p in profiles.items():
        print(f"  op profile [{name}]: matmul {p['matmul_share']:.1%}, attention {p['attention_share']:.1%} "
              f"of {p['ops_ms']:,.1f} ms in ops; matmul {p['matmul_share_of_wall']:.1%} of the step's "
              f"{p['wall_ms']:,.1f} ms under the profiler")
        for op, share in p["top_other_ops"]:
            print(f"      {share:6.1%}  {op}")


# -- the compared steps (--compare hf) -------------------------------------------------
def text_only_step(config, ours: dict):
    """Our step on text-only batches (--compare hf), on the same model and optimizer: a
    second copy of a 1b-width model would not fit next to transformers' in CPU memory."""
    from megatron_emu.training import train

    run, d = ours["run"], config.data
    micro = [train.move_batch(random_batch(config.model, d.micro_batch_size, d.seq_length, 0, seed=i), ours["device"])
             for i in range(run.n_micro)]
    return lambda: train.train_step(run.pmodel, run.optimizer, micro, config, run.precision)


def run_eager(step):
    """`step` with its compiled modules run eagerly (the same model: no second copy)."""
    def eager_step():
        with torch.compiler.set_stance("force_eager"):
            step()

    return eager_step


def profile_ops(args, steps: list, device: torch.device) -> dict:
    """--profile-ops: profiled steps of each side; ours is the text-only step under --compare hf."""
    if args.compare == "hf":
        sides = {"ours": steps[1], "transformers": steps[2]}
        if len(steps) == 4:
            sides["transformers eager"] = steps[3]
    else:
        sides = {"ours": steps[0]}
    profiles = profile_sides(sides, args.profile_top, args.profile_steps, device)
    print_profile(profiles)
    return profiles


if __name__ == "__main__":  # a module of tools/benchmark_throughput.py, not a tool of its own
    from megatron_emu.cli import refuse_run_as_tool

    refuse_run_as_tool(__file__, "--compare hf --profile-ops [--llm-shape 1b --llm-layers N]",
                       "python tools/benchmark_throughput.py --preset tiny --compare hf --profile-ops --no-memory")
