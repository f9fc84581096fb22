#!/usr/bin/env python
"""Data-only benchmark: loader samples/s and tokens/s per CPU core for each sample type,
and preprocess documents/s. `tools/benchmark_throughput.py --data-only` calls
run_data_benchmark().

The loader runs in the main process (num_workers=0), so samples/s is per core; with
N DataLoader workers the loader scales with the cores given to it.

  python tools/benchmark_data.py --seq-length 1024 --micro-batch-size 8 --num-batches 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_SAMPLES_PER_S_PER_CORE = 185  # 50x the paper's ~3.7 samples/s per GPU


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-batches", type=int, default=40, help="timed micro-batches per sample type")
    p.add_argument("--cache-dir", default="", help="where the synthetic corpus is built (default: a temp dir)")
    p.add_argument("--corpus-docs", type=int, default=400, help="synthetic documents per kind for the loader test")
    p.add_argument("--preprocess-docs", type=int, default=200, help="synthetic pair documents for preprocess timing")
    p.add_argument("--preprocess-workers", type=int, default=1)
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def _time_loader(data_path, tok, args, label):
    from megatron_emu.config import DataConfig
    from megatron_emu.data.loader import build_pretrain_loader

    cfg = DataConfig(data_path=data_path, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                     global_batch_size=args.micro_batch_size, num_workers=0)
    loader = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=0)
    for _ in range(3):  # warm-up: page cache, permutations
        next(loader)
    samples = tokens = images = 0
    t0 = time.perf_counter()
    for _ in range(args.num_batches):
        b = next(loader)
        samples += b["tokens"].shape[0]
        tokens += int((b["tokens"] != tok.special.pad).sum())
        images += b["images"].shape[0]
    dt = time.perf_counter() - t0
    return {"type": label, "samples_per_s_per_core": round(samples / dt, 1), "tokens_per_s_per_core": round(tokens / dt),
            "images_per_s_per_core": round(images / dt, 1), "samples": samples}


def run_data_benchmark(args_list: list[str] | None = None) -> dict:
    """Runs the benchmark; returns {"loader": [...], "preprocess": {...}, ...}."""
    args = parse_args(args_list or [])
    import numpy
    import torch

    from megatron_emu.data.loader import ensure_synthetic_corpus
    from megatron_emu.data.preprocess import preprocess, synthetic_shards
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        tok = EmuTokenizer(build_tiny_tokenizer(cache))
        n = args.corpus_docs
        data_path = ensure_synthetic_corpus(cache, tok, sizes={"pairs": n, "interleaved": n // 4, "video": n // 4})
        prefixes = dict(zip(["pairs", "interleaved", "video"], data_path[1::2]))
        loader = [
            _time_loader([prefixes["pairs"]], tok, args, "image-text pair"),
            _time_loader([prefixes["interleaved"]], tok, args, "interleaved (<=5 images)"),
            _time_loader([prefixes["interleaved"] + ":pairs"], tok, args, "interleaved 5-pair view"),
            _time_loader([prefixes["video"]], tok, args, "video (8 frames)"),
            _time_loader(data_path, tok, args, "mixed 8:2:1"),
        ]
        t0 = time.perf_counter()
        report = preprocess(synthetic_shards("pairs", args.preprocess_docs, seed=1, docs_per_shard=50),
                            os.path.join(tmp, "bench_pairs"), "pairs", tok.model_path,
                            workers=args.preprocess_workers, progress=False)
        dt = time.perf_counter() - t0
    result = {
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
        "target_samples_per_s_per_core": TARGET_SAMPLES_PER_S_PER_CORE,
        "loader": loader,
        "preprocess": {"input": "synthetic pairs (render + tokenize + resize + write)", "documents": args.preprocess_docs,
                       "workers": args.preprocess_workers, "documents_per_s": round(args.preprocess_docs / dt, 1)},
        "versions": {"torch": torch.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0]},
        "cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    result = run_data_benchmark(sys.argv[1:])
    print(f"{'sample type':28s} {'samples/s/core':>15s} {'tokens/s/core':>14s} {'images/s/core':>14s}")
    for r in result["loader"]:
        print(f"{r['type']:28s} {r['samples_per_s_per_core']:15.1f} {r['tokens_per_s_per_core']:14d} "
              f"{r['images_per_s_per_core']:14.1f}")
    p = result["preprocess"]
    print(f"preprocess: {p['documents_per_s']} documents/s ({p['input']}, {p['workers']} worker(s))")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
