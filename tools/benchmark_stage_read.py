"""Host memory of one pipeline stage's weights read from a state-dict file, at the real size.

    python tools/benchmark_stage_read.py --preset emu-14b --pipeline-model-parallel-size 8 --stage 3
    python tools/benchmark_stage_read.py --preset 1b --pipeline-model-parallel-size 4 --stage 0 --whole

Writes a sparse safetensors file with every tensor of the preset's Emu (bf16, zeros: the
file takes no disk blocks, so a 14B file costs nothing to make), then, in a fresh process
per variant, builds the stage as generation/inference.py does and reports the process's
peak RSS:
- part:  partial_source + read_part, the stage's tensors only (what build_inference does);
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


def build_stage(path: str, preset: str, pp: int, stage: int, whole: bool) -> dict:
    from megatron_emu.generation.loading import load_for_inference, partial_source, read_part

    start = time.perf_counter()
    layers = even_split(get_preset(preset).llm.layers, pp)
    keep = lambda emu: prune_to_stage(emu, stage, layers)  # noqa: E731
    if whole:
        part = keep(load_for_inference(path, preset))
    else:
        source, config = partial_source(path, preset)
        part = read_part(source, config, keep)
    return {"variant": "whole" if whole else "part", "preset": preset, "pp": pp, "stage": stage,
            "stage_layers": list(layers), "stage_gib_fp32": sum(t.numel() for t in part.state_dict().values()) * 4 / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="emu-14b")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=8)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--whole", action="store_true", help="also the whole-model path (needs ~4 bytes/param)")
    parser.add_argument("--dir", default=None, help="where the sparse file goes (default: a temporary dir)")
    parser.add_argument("--child", choices=["part", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        row = build_stage(args.file, args.preset, args.pipeline_model_parallel_size, args.stage, args.child == "whole")
        print("STAGE_READ_JSON " + json.dumps(row), flush=True)
        return [row]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, f"{args.preset}.safetensors")
        size = write_sparse_state_file(path, args.preset)
        print(f"{path}: {size / 2**30:.1f} GiB (bf16, sparse)")
        rows = []
        for variant in ["part"] + (["whole"] if args.whole else []):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--file", path, "--preset", args.preset,
                                  "--pipeline-model-parallel-size", str(args.pipeline_model_parallel_size),
                                  "--stage", str(args.stage)], capture_output=True, text=True, check=True).stdout
            row = json.loads(out.split("STAGE_READ_JSON ", 1)[1])
            row["file_gib_bf16"] = size / 2**30
            print("STAGE_READ_JSON " + json.dumps(row), flush=True)
            rows.append(row)
        return rows


if __name__ == "__main__":
    main()
