"""Host memory of one pipeline stage's weights read from a state-dict file, at the real size.

    python tools/benchmark_stage_read.py --preset emu-14b --pipeline-model-parallel-size 8 --stage 3
    python tools/benchmark_stage_read.py --preset 1b --pipeline-model-parallel-size 4 --stage 0 --whole
    python tools/benchmark_stage_read.py --preset emu-14b --pipeline-model-parallel-size 8 --stage 3 \
        --tensor-model-parallel-size 4      # TP ranks as gloo processes: each reads its shards

Writes a sparse safetensors file with every tensor of the preset's Emu (bf16, zeros: the
file takes no disk blocks, so a 14B file costs nothing to make), then, in a fresh process
per variant, builds the stage as generation/inference.py does and reports the process's
peak RSS:
- part:  partial_source + read_part, the stage's tensors only (what build_inference does);
         with --tensor-model-parallel-size T, T gloo processes (torchrun) shard the stage on
         the meta device first and each keeps its slices: the peak RSS of the largest rank;
- whole: the whole Emu loaded in float32 on the CPU (load_for_inference, the single-process
         API), then cut to the stage (--whole, at sizes that fit in memory).
Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_emu.config import get_preset  # noqa: E402
from megatron_emu.model.emu import build_emu  # noqa: E402
from megatron_emu.parallel.balance import even_split  # noqa: E402
from megatron_emu.parallel.pipeline import prune_to_stage  # noqa: E402


def write_sparse_state_file(path: str, preset: str) -> int:
    """Every tensor of `preset`'s Emu as bf16 zeros, the data a hole; the file's size."""
    header, offset = {}, 0
    for name, tensor in sorted(build_emu(get_preset(preset), device="meta").state_dict().items()):
        size = tensor.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        f.truncate(8 + len(encoded) + offset)
    return 8 + len(encoded) + offset


def build_stage(path: str, preset: str, pp: int, stage: int, whole: bool, shard=None,
                dtype: torch.dtype = torch.float32) -> dict:
    from megatron_emu.generation.loading import load_for_inference, read_part
    from megatron_emu.generation.weight_sources import partial_source

    start = time.perf_counter()
    layers = even_split(get_preset(preset).llm.layers, pp)
    keep = lambda emu: prune_to_stage(emu, stage, layers)  # noqa: E731
    if whole:
        part = keep(load_for_inference(path, preset)).to(dtype)
    else:
        source, config = partial_source(path, preset)
        part = read_part(source, config, keep, shard, dtype=dtype)
    local = sum(getattr(t, "_local_tensor", t).numel() for t in part.state_dict().values())
    return {"variant": "whole" if whole else "part", "preset": preset, "pp": pp, "stage": stage, "dtype": str(dtype),
            "stage_layers": list(layers), "stage_gib_fp32": sum(t.numel() for t in part.state_dict().values()) * 4 / 2**30,
            "rank_gib_fp32": local * 4 / 2**30, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": round(time.perf_counter() - start, 2)}


def build_stage_tp(path: str, preset: str, pp: int, stage: int, dtype: torch.dtype) -> dict:
    """One TP rank of a torchrun group: the stage sharded over the group, each rank its shards;
    rank 0 returns the row of the rank with the largest peak RSS."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_emu.generation.forward import shard_for_inference

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    row = build_stage(path, preset, pp, stage, False, lambda part: shard_for_inference(part, mesh), dtype)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    return dict(max(rows, key=lambda r: r["peak_rss_gib"]), tp=len(rows))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny: a quick run; emu-14b: the paper's size")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=2)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--whole", action="store_true", help="also the whole-model path (needs ~4 bytes/param)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="part: as T gloo ranks (torchrun)")
    parser.add_argument("--bf16", action="store_true", help="the part in bf16, as an inference run with --bf16")
    parser.add_argument("--dir", default=None, help="where the sparse file goes (default: a temporary dir)")
    parser.add_argument("--child", choices=["part", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        pp, tp = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        row = (build_stage_tp(args.file, args.preset, pp, args.stage, dtype) if tp > 1 else
               build_stage(args.file, args.preset, pp, args.stage, args.child == "whole", dtype=dtype))
        if int(os.environ.get("RANK", "0")) == 0:
            print("STAGE_READ_JSON " + json.dumps(row), flush=True)
        return [row]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, f"{args.preset}.safetensors")
        size = write_sparse_state_file(path, args.preset)
        print(f"{path}: {size / 2**30:.1f} GiB (bf16, sparse)")
        rows = []
        for variant in ["part"] + (["whole"] if args.whole else []):
            tp = args.tensor_model_parallel_size if variant == "part" else 1
            launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc-per-node", str(tp)] if tp > 1 else [])
            out = subprocess.run(launch + [__file__, "--child", variant, "--file", path, "--preset", args.preset,
                                           "--pipeline-model-parallel-size", str(args.pipeline_model_parallel_size),
                                           "--tensor-model-parallel-size", str(tp), "--stage", str(args.stage)]
                                 + (["--bf16"] if args.bf16 else []),
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.split("STAGE_READ_JSON ", 1)[1])
            row["file_gib_bf16"] = size / 2**30
            print("STAGE_READ_JSON " + json.dumps(row), flush=True)
            rows.append(row)
        return rows


if __name__ == "__main__":
    main()
    from megatron_emu.cli import end_process_group

    end_process_group()  # on success only: an error exited above
