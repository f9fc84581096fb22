#!/usr/bin/env python
"""Raw multimodal data -> megatron-core indexed dataset (.bin/.idx, multimodal=True).

Examples:
  # LAION-style WebDataset shards (or JSONL / parquet of image path + caption)
  python tools/preprocess_data.py --input-type pairs --input 'laion/{00000..00099}.tar' \
      --output-prefix data/laion --tokenizer-model llama/tokenizer.model --workers 16
  # MMC4 interleaved documents
  python tools/preprocess_data.py --input-type mmc4 --input mmc4/docs_*.jsonl --output-prefix data/mmc4 ...
  # Video clips (frame folders or video files) with timestamped subtitles
  python tools/preprocess_data.py --input-type video --input webvid/manifest_*.jsonl --output-prefix data/webvid ...
  # Instruction tuning (Emu-I): ShareGPT / Alpaca / LLaVA-Instruct / VideoChat JSON
  python tools/preprocess_data.py --input-type llava --input llava_instruct_150k.json --output-prefix data/llava ...
  # The bundled synthetic corpus, kind pairs | interleaved | video
  python tools/preprocess_data.py --input-type synthetic-pairs --num-documents 2000 --output-prefix data/syn_pairs
  # Multi-node: job i of n writes its parts (SLURM array variables give i and n), then one merge
  python tools/preprocess_data.py --input-type pairs --input 'laion/{00000..09999}.tar' --output-prefix data/laion \
      --shard-index 3 --num-shards 64 --resume
  python tools/preprocess_data.py --input-type pairs --input 'laion/{00000..09999}.tar' --output-prefix data/laion \
      --merge

Writes <prefix>.bin, <prefix>.idx, <prefix>.json (format metadata, checksums) and <prefix>.report.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emu.cli import ToolParser, full_disk_as_error  # noqa: E402
from megatron_emu.data.images import IMAGE_FORMATS, JPEG_QUALITY  # noqa: E402
from megatron_emu.data.preprocess import Shard, merge_parts, preprocess, synthetic_shards  # noqa: E402

KIND_OF_INPUT = {"pairs": "pairs", "mmc4": "interleaved", "video": "video",
                 # instruction tuning (Emu-I): conversations, written with 6 special tokens
                 "sharegpt": "conversation", "alpaca": "conversation", "llava": "conversation",
                 "videochat": "conversation"}


def expand_inputs(patterns: list[str]) -> list[str]:
    """Globs and brace ranges ({00000..00099}, as in WebDataset URLs) -> sorted paths."""
    out = []
    for pattern in patterns:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
        if m:
            width = len(m.group(1))
            names = [pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]
                     for i in range(int(m.group(1)), int(m.group(2)) + 1)]
        else:
            names = sorted(glob.glob(pattern)) or [pattern]  # a missing file is reported, not fatal
        out.extend(names)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                   example="python tools/preprocess_data.py --input-type synthetic-pairs --num-documents 200 "
                           "--output-prefix data/syn_pairs")
    p.add_argument("--input-type", required=True,
                   choices=["pairs", "mmc4", "video", "sharegpt", "alpaca", "llava", "videochat",
                            "synthetic-pairs", "synthetic-interleaved", "synthetic-video"])
    p.add_argument("--input", nargs="*", default=[], help="input files (globs, {a..b} ranges); one shard each")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", default="", help="sentencepiece .model (default: the tiny tokenizer)")
    p.add_argument("--num-special-tokens", type=int, default=None, choices=[4, 6],
                   help="added tokens: 4, or 6 with [USER] [ASSISTANT] (default: 6 for conversations, else 4)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default=None,
                   help=f"how images are stored: jpeg (quality {JPEG_QUALITY}, or the input's bytes when it already "
                        "is an S x S baseline RGB JPEG; default for web inputs) or raw uint8 pixels (default for "
                        "the synthetic corpus)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="skip shards whose partial output is complete")
    p.add_argument("--keep-parts", action="store_true", help="keep per-shard partial files after merging")
    p.add_argument("--report", default="", help="also write the JSON report here")
    p.add_argument("--num-documents", type=int, default=2000, help="synthetic inputs: number of documents")
    p.add_argument("--seed", type=int, default=0, help="synthetic inputs: corpus seed")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("multi-node preprocessing")
    g.add_argument("--shard-index", type=int, default=None,
                   help="this job's index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0); "
                        "input files i, i + n, i + 2n, ... are its shards")
    g.add_argument("--num-shards", type=int, default=None,
                   help="number of jobs (default: $SLURM_ARRAY_TASK_COUNT, else 1); with n > 1 a job writes only "
                        "its parts (<prefix>.parts/) and --merge joins them")
    g.add_argument("--merge", action="store_true",
                   help="concatenate every job's parts into <prefix>.bin/.idx without decoding anything "
                        "(same --input and settings as the jobs)")
    args = p.parse_args(argv)
    _job_defaults(args)
    return args


def _job_defaults(args: argparse.Namespace) -> None:
    """--shard-index / --num-shards from a SLURM job array unless given (not for --merge)."""
    env = os.environ
    in_array = "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env and not args.merge
    if args.num_shards is None:
        args.num_shards = int(env["SLURM_ARRAY_TASK_COUNT"]) if in_array else 1
    if args.shard_index is None:
        args.shard_index = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                            if in_array else 0)
    if args.num_shards < 1:
        raise ValueError(f"--num-shards {args.num_shards} must be >= 1")
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index} is outside [0, --num-shards {args.num_shards})")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer_model = args.tokenizer_model
    if not tokenizer_model:
        from megatron_emu.data.tokenizer import build_tiny_tokenizer

        tokenizer_model = build_tiny_tokenizer()
    if args.input_type.startswith("synthetic-"):
        kind = args.input_type[len("synthetic-"):]
        shards = synthetic_shards(kind, args.num_documents, args.seed)
    else:
        kind = KIND_OF_INPUT[args.input_type]
        paths = expand_inputs(args.input)
        if not paths:
            raise ValueError(f"--input: no input files given for --input-type {args.input_type}")
        if any(p.endswith(".parquet") for p in paths):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError("--input: parquet inputs need pyarrow (pip install pyarrow)") from None
        shards = [Shard(i, args.input_type, path, path) for i, path in enumerate(paths)]
    image_format = args.image_format or ("raw" if args.input_type.startswith("synthetic-") else "jpeg")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    num_special = args.num_special_tokens or (6 if kind == "conversation" else 4)
    if kind == "conversation" and num_special != 6:
        raise ValueError(f"--input-type {args.input_type}: conversations need [USER] / [ASSISTANT] "
                         "(--num-special-tokens 6)")
    settings = dict(num_special=num_special, image_size=args.image_size, image_format=image_format)
    # A part is complete only once its .json is written, the dataset only once its .json is:
    # what a full disk interrupted is redone, what was finished is kept.
    again = "the same command" if args.merge else "the same command with --resume"
    with full_disk_as_error(args.output_prefix, f"free space, then run {again}: finished shards are kept"):
        if args.merge:
            report = merge_parts(shards, args.output_prefix, kind, tokenizer_model, keep_parts=args.keep_parts,
                                 **settings)
        else:
            report = preprocess(shards, args.output_prefix, kind, tokenizer_model, workers=args.workers,
                                resume=args.resume, progress=not args.no_progress, keep_parts=args.keep_parts,
                                shard_index=args.shard_index, num_shards=args.num_shards, **settings)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    summary = {k: report[k] for k in ("documents_in", "documents_out", "images_kept", "skipped", "documents_per_s")}
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
