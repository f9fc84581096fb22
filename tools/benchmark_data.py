#!/usr/bin/env python
"""Data-only benchmark: loader samples/s and tokens/s per CPU core for each sample type,
and preprocess documents/s (synthetic pairs, and real JPEG input: a WebDataset tar of
LAION-like JPEGs generated here). `tools/benchmark_throughput.py --data-only` calls
run_data_benchmark().

The loader runs in the main process (num_workers=0), so samples/s is per core; with
N DataLoader workers the loader scales with the cores given to it.

  python tools/benchmark_data.py --seq-length 1024 --micro-batch-size 8 --num-batches 40
  python tools/benchmark_data.py --jpeg-images 2000 --jpeg-size 500x400 --jpeg-only
  python tools/benchmark_data.py --image-format jpeg --jpeg-images 0   # loader decoding stored JPEGs

Scale mode (tools/data_scale.py): start-up time and peak RSS of a fresh loader process
against dataset size, on fake datasets (a real .idx written with numpy, a sparse .bin):

  python tools/benchmark_data.py --scale --scale-pairs 1e4,1e6,1e8 --scale-interleaved 1e4,1e6,1e7
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
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
    p.add_argument("--jpeg-images", type=int, default=2000, help="JPEGs in the generated WebDataset tars (0: skip)")
    p.add_argument("--jpeg-size", default="500x400", help="WxH of the generated JPEGs (LAION-like)")
    p.add_argument("--jpeg-shards", type=int, default=4)
    p.add_argument("--jpeg-only", action="store_true", help="only the JPEG preprocess measurement")
    p.add_argument("--image-format", choices=["raw", "jpeg"], default="raw",
                   help="jpeg: the loader reads the corpus stored as JPEG, each image given photo-like "
                        "texture first (sensor-like noise, as --jpeg-images) so decoding does a photo's work")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--scale", action="store_true", help="only the start-up / RSS against dataset size measurement")
    p.add_argument("--scale-pairs", default="1e4,1e5,1e6,1e7,1e8", help="pair dataset sizes (documents)")
    p.add_argument("--scale-interleaved", default="1e4,1e5,1e6,1e7", help="interleaved dataset sizes (documents)")
    p.add_argument("--scale-dir", default="", help="where the fake datasets go (default: a temp dir; deleted after)")
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.num_batches):
        b = next(loader)
        samples += b["tokens"].shape[0]
        tokens += int((b["tokens"] != tok.special.pad).sum())
        images += b["images"].shape[0]
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"type": label, "samples_per_s_per_core": round(samples / dt, 1), "tokens_per_s_per_core": round(tokens / dt),
            "images_per_s_per_core": round(images / dt, 1), "samples": samples,
            # CPU time of this (single-threaded) process: the per-core rate even on a busy machine
            "samples_per_cpu_s": round(samples / cpu, 1)}


def make_jpeg_shards(out_dir: str, num_images: int, size: tuple[int, int], num_shards: int, seed: int = 0):
    """WebDataset tars of photo-like JPEGs (smooth colour fields plus sensor-like noise, so
    entropy decoding does real work) with .txt captions. Returns (paths, mean JPEG bytes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    paths, total = [], 0
    for s in range(num_shards):
        path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(s, num_images, num_shards):
                coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
                pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
                buf = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                total += buf.tell()
                caption = f"a photo number {i} of a colourful scene with soft light".encode()
                for name, payload in ((f"{i:08d}.jpg", buf.getvalue()), (f"{i:08d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths, total / max(num_images, 1)


def _time_jpeg_preprocess(args, tok, tmp) -> dict:
    from megatron_emu.data.indexed import _mcore
    from megatron_emu.data.preprocess import Shard, preprocess

    w, h = (int(x) for x in args.jpeg_size.lower().split("x"))
    src = os.path.join(tmp, "jpeg_shards")
    os.makedirs(src, exist_ok=True)
    paths, mean_bytes = make_jpeg_shards(src, args.jpeg_images, (w, h), args.jpeg_shards)
    shards = [Shard(i, "pairs", p, p) for i, p in enumerate(paths)]
    _mcore()  # its import (seconds) is not preprocessing work
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    report = preprocess(shards, os.path.join(tmp, "bench_jpeg"), "pairs", tok.model_path,
                        workers=args.preprocess_workers, progress=False, image_format=args.image_format)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    if report["documents_out"] != args.jpeg_images:
        raise RuntimeError(f"JPEG benchmark lost documents: {report['skipped']}")
    n = report["documents_out"]
    return {"input": f"WebDataset tars of {w}x{h} JPEG (q90, mean {mean_bytes / 1024:.0f} KiB) + caption",
            "documents": n, "workers": args.preprocess_workers, "shards": len(paths),
            "stored_as": args.image_format, "stored_bytes_per_image": round(os.path.getsize(
                os.path.join(tmp, "bench_jpeg.bin")) / n),
            "documents_per_s": round(n / dt, 1), "documents_per_s_per_core": round(n / dt / args.preprocess_workers, 1),
            # CPU time of this process and its (joined) workers: per-core speed even on a busy machine
            "documents_per_cpu_s": round(n / cpu, 1), "load_average": os.getloadavg()[0]}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_data_benchmark(args_list: list[str] | None = None) -> dict:
    """Runs the benchmark; returns {"loader": [...], "preprocess": {...}, "preprocess_jpeg": {...}, ...}."""
    args = parse_args(args_list or [])
    import numpy
    import PIL
    import torch

    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    torch.set_num_threads(1)
    result = {"seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
              "target_samples_per_s_per_core": TARGET_SAMPLES_PER_S_PER_CORE}
    with tempfile.TemporaryDirectory(dir=args.scale_dir or None) as tmp:
        cache = args.cache_dir or tmp
        tok = EmuTokenizer(build_tiny_tokenizer(cache))
        if args.scale:
            result["scale"] = _scale(args, tok, tmp)
        elif not args.jpeg_only:
            result.update(_loader_and_synthetic_preprocess(args, tok, cache, tmp))
        if args.jpeg_images and not args.scale:
            result["preprocess_jpeg"] = _time_jpeg_preprocess(args, tok, tmp)
    result["versions"] = {"torch": torch.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
                          "python": sys.version.split()[0]}
    result.update(cpu=_cpu_name(), date=time.strftime("%Y-%m-%d"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _loader_and_synthetic_preprocess(args, tok, cache, tmp) -> dict:
    from megatron_emu.data.loader import ensure_synthetic_corpus
    from megatron_emu.data.preprocess import preprocess, synthetic_shards

    n = args.corpus_docs
    data_path = ensure_synthetic_corpus(cache, tok, sizes={"pairs": n, "interleaved": n // 4, "video": n // 4})
    images = None
    if args.image_format == "jpeg":
        data_path, images = _photo_like_jpeg_corpus(data_path, tmp)
    prefixes = dict(zip(["pairs", "interleaved", "video"], data_path[1::2]))
    loader = [
        _time_loader([prefixes["pairs"]], tok, args, "image-text pair"),
        _time_loader([prefixes["interleaved"]], tok, args, "interleaved (<=5 images)"),
        _time_loader([prefixes["interleaved"] + ":pairs"], tok, args, "interleaved 5-pair view"),
        _time_loader([prefixes["video"]], tok, args, "video (8 frames)"),
        _time_loader(data_path, tok, args, "mixed 8:2:1"),
    ]
    t0 = time.perf_counter()
    preprocess(synthetic_shards("pairs", args.preprocess_docs, seed=1, docs_per_shard=50),
               os.path.join(tmp, "bench_pairs"), "pairs", tok.model_path,
               workers=args.preprocess_workers, progress=False)
    dt = time.perf_counter() - t0
    return {"loader": loader, "image_format": args.image_format, "images": images,
            "preprocess": {"input": "synthetic pairs (render + tokenize + resize + write)",
                           "documents": args.preprocess_docs, "workers": args.preprocess_workers,
                           "documents_per_s": round(args.preprocess_docs / dt, 1)}}


def _scale(args, tok, tmp) -> dict:
    from tools.data_scale import bundled_plan_speed, check_disk, run_scale

    sizes = {kind: [int(float(x)) for x in spec.split(",") if x]
             for kind, spec in (("pairs", args.scale_pairs), ("interleaved", args.scale_interleaved))}
    sizes = {k: v for k, v in sizes.items() if v}
    check_disk(tmp, sizes)
    return {"bundled_plan_chunks": bundled_plan_speed(tok, args.cache_dir), "sizes": run_scale(sizes, tmp, tok)}


def _photo_like_jpeg_corpus(data_path: list, tmp: str, noise: float = 6.0) -> tuple[list, dict]:
    """The raw corpus rewritten with image_format jpeg, each image given photo-like texture
    first. Returns (data_path, stats: bytes per image raw / jpeg, PSNR of the decoded JPEG
    against the pixels encoded, decode ms per image with simplejpeg and with Pillow)."""
    import numpy as np

    from megatron_emu.data.images import decode_jpeg, encode_jpeg
    from megatron_emu.data.indexed import MODE_IMAGE, DocumentWriter, MultimodalIndexed

    rng = np.random.default_rng(0)
    out, psnrs, sizes, encoded = [], [], [], []
    for weight, prefix in zip(data_path[::2], data_path[1::2]):
        raw = MultimodalIndexed(prefix)
        target = os.path.join(tmp, "jpeg-" + os.path.basename(prefix))
        writer = DocumentWriter(target, raw.meta["vocab_size"], raw.image_size, "jpeg")
        for doc in range(len(raw)):
            items = []
            for mode, value in raw.read_document(doc):
                if mode == MODE_IMAGE:
                    value = (value + rng.normal(0, noise, value.shape)).clip(0, 255).astype(np.uint8)
                    data = encode_jpeg(value)
                    mse = np.mean((decode_jpeg(data, raw.image_size).astype(np.float64) - value) ** 2)
                    psnrs.append(10 * np.log10(255 ** 2 / mse))
                    sizes.append(len(data))
                    encoded.append(data)
                    value = data
                items.append((mode, value))
            writer.add_document(items)
        writer.finalize({k: raw.meta[k] for k in ("kind", "image_size", "tokenizer", "vocab_size")}
                        | {"num_documents": len(raw)})
        out += [weight, target]
    return out, {"raw_bytes_per_image": 3 * raw.image_size ** 2, "jpeg_bytes_per_image": round(float(np.mean(sizes))),
                 "psnr_db_mean": round(float(np.mean(psnrs)), 2), "psnr_db_min": round(float(np.min(psnrs)), 2),
                 **_decode_ms(encoded[:500])}


def _decode_ms(encoded: list[bytes]) -> dict:
    """Decode time per 224 px image: simplejpeg (what the loader uses) against Pillow."""
    import numpy as np
    import simplejpeg
    from PIL import Image

    def per_image(decode) -> float:
        t0 = time.process_time()
        for data in encoded:
            decode(data)
        return round((time.process_time() - t0) / len(encoded) * 1e3, 3)

    return {"decode_ms_simplejpeg": per_image(lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB")),
            "decode_ms_pillow": per_image(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")))}


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
    if "scale" in result:
        from tools.data_scale import print_table

        print_table(result["scale"]["sizes"])
        print("plan_chunks on the bundled corpus:", json.dumps(result["scale"]["bundled_plan_chunks"]))
    if "loader" in result:
        print(f"{'sample type':28s} {'samples/s/core':>15s} {'tokens/s/core':>14s} {'images/s/core':>14s} "
              f"{'samples/CPU-s':>14s}")
        for r in result["loader"]:
            print(f"{r['type']:28s} {r['samples_per_s_per_core']:15.1f} {r['tokens_per_s_per_core']:14d} "
                  f"{r['images_per_s_per_core']:14.1f} {r['samples_per_cpu_s']:14.1f}")
        if result.get("images"):
            print("stored images:", json.dumps(result["images"]))
        p = result["preprocess"]
        print(f"preprocess: {p['documents_per_s']} documents/s ({p['input']}, {p['workers']} worker(s))")
    if "preprocess_jpeg" in result:
        p = result["preprocess_jpeg"]
        print(f"preprocess JPEG: {p['documents_per_s_per_core']} documents/s/core, {p['documents_per_cpu_s']} per "
              f"CPU-second ({p['input']}, {p['workers']} worker(s), load average {p['load_average']:.1f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
