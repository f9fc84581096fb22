"""Plan a cluster layout: memory per rank and estimated throughput of every TP x PP x DP
layout (with and without activation recompute) the trainer accepts; prints the
recommended one as pretrain_emu.py flags.

    python tools/plan.py --preset emu-14b --gpus 128 --gpu a100-80g
    python tools/plan.py --preset 1b --gpus 8 --gpu h100-80g --micro-batch-size 4 --top 20 --json

The model behind the numbers: megatron_emu/parallel/planner.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_emu.config import PRESETS, get_preset, recipe_config  # noqa: E402
from megatron_emu.parallel.planner import HARDWARE, Workload, plan  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="emu-14b", choices=sorted(PRESETS))
    p.add_argument("--gpus", type=int, default=128)
    p.add_argument("--gpu", default="a100-80g", choices=sorted(HARDWARE))
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="override the GPU's memory")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the preset's recipe")
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--images-per-sample", type=int, default=2,
                   help="images (video frames) per sample of the data mix: FLOPs and the pipeline balance")
    p.add_argument("--fp32", action="store_true", help="plan fp32 training (default: bf16)")
    p.add_argument("--pipeline-balance-costs", default="", metavar="FILE",
                   help="split pipeline stages by the measured block times of FILE "
                        "(tools/benchmark_throughput.py --measure-block-costs) instead of FLOPs")
    p.add_argument("--vision-tensor-parallel", default="heads", choices=["heads", "images", "auto"],
                   help="TP placement of the ViT and Causal Former, as pretrain_emu.py's flag (memory per rank)")
    p.add_argument("--top", type=int, default=12, help="rows to print")
    p.add_argument("--json", action="store_true", help="also print every row as JSON lines")
    return p.parse_args(argv)


EXPOSED_COMM_WARNING = 0.25  # '!' in the table: more of the step than this waits on collectives


def assumptions(hw) -> str:
    """What the step-time model takes for granted, printed with every plan."""
    return (f"assumed: matmul-bound blocks at {hw.efficiency:.0%} of peak; TP collectives on "
            f"{hw.intra_node_gbs:g} GB/s per GPU (NVLink, {hw.gpus_per_node} GPUs per node) and fully exposed; "
            f"DP on {hw.inter_node_gbs:g} GB/s per GPU across nodes; FSDP all-gathers prefetched behind compute; "
            f"gradients reduced once per step, hidden by the last micro-batch's backward (each stage's with PP; "
            f"not at all with zero-bubble); 1F1B bubble (PP-1)/v micro-batches; "
            f"image encoders as --vision-tensor-parallel places them (heads: 1/TP of their FLOPs + TP all-reduces per block; "
            f"images: ceil(images/TP) each + one fp32 gradient all-reduce per step; replicated: all of them)")


def flags(row, images_per_sample: float, vision_tensor_parallel: str = "heads", costs_file: str = "") -> str:
    d = row.dims
    text = (f"--tensor-model-parallel-size {d.tp} --pipeline-model-parallel-size {d.pp} "
            f"--data-parallel-sharding {d.sharding}")
    if d.tp > 1 and vision_tensor_parallel != "heads":
        text += f" --vision-tensor-parallel {vision_tensor_parallel}"
    if d.pp > 1:
        text += f" --pipeline-schedule {d.schedule} --pipeline-balance auto"
        if images_per_sample != 2:
            text += f" --pipeline-balance-images-per-sample {images_per_sample:g}"
        if costs_file:
            text += f" --pipeline-balance-costs {costs_file}"
    if row.recompute == "selective":
        text += " --recompute-activations"
    elif row.recompute == "full":
        text += " --recompute-granularity full"
    return text


def short(dims) -> str:
    text = f"TP={dims.tp} PP={dims.pp} DP={dims.dp} {dims.sharding}"
    return text + (f" {dims.schedule} ({dims.num_stages} stages)" if dims.pp > 1 else "")


def exposed_too_much(row) -> bool:
    return row.time["exposed_comm_fraction"] > EXPOSED_COMM_WARNING


def table(rows, top: int) -> str:
    head = (f"{'layout':<44} {'recompute':<9} {'weights+grads+opt':>17} {'activ.':>7} {'transient':>9} "
            f"{'total GiB':>9} {'fits':>4} {'tokens/s':>9} {'MFU':>5} {'exposed comm':>12}")
    lines = [head, "-" * len(head)]
    for row in rows[:top]:
        m = row.memory.row()
        static = m["weights"] + m["grads"] + m["optimizer"]
        lines.append(f"{short(row.dims):<44} {str(row.recompute or '-'):<9} {static:>17.2f} "
                     f"{m['activations']:>7.2f} {m['transient']:>9.2f} {m['total']:>9.2f} {'yes' if row.fits else 'no':>4} "
                     f"{row.time['tokens_per_s']:>9,.0f} {row.time['mfu']:>5.1%} "
                     f"{row.time['exposed_comm_fraction']:>11.0%}{'!' if exposed_too_much(row) else ' '}")
    return "\n".join(lines)


def main(argv=None) -> list:
    args = parse_args(argv)
    recipe = recipe_config(args.preset).data  # what pretraining runs without flags
    work = Workload(
        micro_batch_size=args.micro_batch_size or recipe.micro_batch_size,
        global_batch_size=args.global_batch_size or recipe.global_batch_size,
        seq_length=args.seq_length or recipe.seq_length,
        images_per_sample=args.images_per_sample,
        dtype="float32" if args.fp32 else "bfloat16",
        vision_tensor_parallel=args.vision_tensor_parallel,
    )
    hw = HARDWARE[args.gpu]
    hw = dataclasses.replace(hw, memory_gib=args.gpu_memory_gib or hw.memory_gib,
                             peak_tflops=args.peak_tflops or hw.peak_tflops)
    rows = plan(get_preset(args.preset), work, args.gpus, hw, costs_file=args.pipeline_balance_costs)
    if not rows:
        raise ValueError(f"tools/plan.py: no TP x PP x DP layout of {args.gpus} GPUs accepts global batch "
                         f"{work.global_batch_size} / micro-batch {work.micro_batch_size} for {args.preset}")
    print(f"{args.preset} on {args.gpus} x {hw.name} ({hw.memory_gib:g} GiB, {hw.peak_tflops:g} TFLOP/s bf16); {work}")
    print(assumptions(hw))
    print(table(rows, args.top))
    best = rows[0]
    if best.fits and exposed_too_much(best):
        print(f"\nwarning: {best.time['exposed_comm_fraction']:.0%} of the recommended step is exposed communication "
              f"(> {EXPOSED_COMM_WARNING:.0%}): the estimate leans on the bandwidth assumptions above")
    if best.fits:
        print(f"\nrecommended: {best.dims.describe()}, recompute {best.recompute or 'off'}: "
              f"{best.memory.row()['total']} GiB per GPU, ~{best.time['tokens_per_s']:,.0f} tokens/s\n"
              f"  pretrain_emu.py --preset {args.preset} {flags(best, args.images_per_sample, args.vision_tensor_parallel, args.pipeline_balance_costs)}{' --bf16' if not args.fp32 else ''}")
    else:
        print("\nno layout fits in memory: add GPUs, lower --micro-batch-size or --seq-length")
    if args.json:
        for row in rows:
            print(json.dumps(dict(layout=row.dims.describe(), recompute=row.recompute, fits=row.fits,
                                  memory_gib=row.memory.row(), **row.time)))
    return rows


if __name__ == "__main__":
    main()
