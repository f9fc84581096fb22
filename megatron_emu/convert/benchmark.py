"""Conversion throughput vs this machine's raw disk speed, with peak memory per phase.

    python -m megatron_emu.convert.benchmark --preset 1b --workdir /tmp/convbench [--keep] [--reuse]

Phases, each in its own child process (peak RSS from wait4, time inside the child):
  make      a random Emu of the preset saved as our DCP checkpoint (import with no inputs)
  export    DCP -> HF directory (tools/convert_checkpoint.py --to hf), split into fixed costs
            (transformers import, tokenizer conversion), DCP reads (the items' geometry; the
            bytes of tensors stored whole are read while their shard is written) and shard writes
  import    HF directory -> DCP (--from hf-emu)
  raw       the same number of bytes written / read with numpy alone (tofile + fsync,
            fromfile), with safetensors alone, and with direct_io.DirectFile (O_DIRECT +
            fsync, what the converters write with): the disk's speed, the ceiling
Export and import each run twice: with their input dropped from the page cache first
("cold", posix_fadvise DONTNEED: read from disk) and read into it first ("warm").
Prints one JSON object; BENCHMARKS.md ("Checkpoint conversion throughput") records a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

GiB = 2**30


def _timed(registry: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            registry[key] = registry.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def padded_tokenizer(vocab: int, path: str) -> str:
    """The tiny sentencepiece model grown to `vocab` pieces (rare made-up words), so the
    tokenizer conversion runs at the preset's real vocabulary size."""
    from sentencepiece import sentencepiece_model_pb2

    from megatron_emu.data.tokenizer import build_tiny_tokenizer

    model = sentencepiece_model_pb2.ModelProto()
    with open(build_tiny_tokenizer(), "rb") as f:
        model.ParseFromString(f.read())
    lowest = min(p.score for p in model.pieces)
    for i in range(vocab - len(model.pieces)):
        model.pieces.add(piece=f"\u2581zq{i}", score=lowest - 1 - i * 1e-3)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def child_export(ckpt: str, out: str, shard: int, preset: str) -> dict:
    times: dict[str, float] = {}
    start = time.perf_counter()
    import transformers  # noqa: F401  (a fixed cost of every export)

    times["import transformers"] = time.perf_counter() - start
    from megatron_emu.config import get_preset
    from megatron_emu.convert import export, streams

    export.export_tokenizer = _timed(times, "tokenizer", export.export_tokenizer)
    streams.DCPSource.read = _timed(times, "read DCP", streams.DCPSource.read)
    streams.write_shard = _timed(times, "write safetensors", streams.write_shard)
    tokenizer = padded_tokenizer(get_preset(preset).llm.base_vocab_size, os.path.join(os.path.dirname(out), "sp.model"))
    begin = time.perf_counter()
    export.export_hf(ckpt, out, tokenizer, max_shard_bytes=shard)
    times["export_hf total"] = time.perf_counter() - begin
    return times


def child_import(hf: str, out: str, preset: str, shard: int) -> dict:
    from megatron_emu.config import get_preset
    from megatron_emu.convert import dcp_writer
    from megatron_emu.convert.imports import import_checkpoint

    times: dict[str, float] = {}
    dcp_writer.GroupedDCPWriter.write = _timed(times, "write DCP", dcp_writer.GroupedDCPWriter.write)
    begin = time.perf_counter()
    import_checkpoint([("hf-emu", hf)], get_preset(preset), out, preset=preset, max_shard_bytes=shard)
    times["import total"] = time.perf_counter() - begin
    return times


def child_make(out: str, preset: str) -> dict:
    from megatron_emu.config import get_preset
    from megatron_emu.convert.imports import import_checkpoint

    begin = time.perf_counter()
    import_checkpoint([], get_preset(preset), out, preset=preset, seed=0)
    return {"make total": time.perf_counter() - begin}


def child_raw(directory: str, total: int, shard: int) -> dict:
    """Write and read `total` bytes in `shard`-sized files: numpy alone, then safetensors alone."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(directory)
    block = np.random.default_rng(0).standard_normal(shard // 4, dtype=np.float32)
    n = max(1, total // shard)
    times = {}
    start = time.perf_counter()
    for i in range(n):
        with open(os.path.join(directory, f"raw{i}.bin"), "wb") as f:
            block.tofile(f)
            f.flush()
            os.fsync(f.fileno())  # DCP fsyncs too: count the disk, not the page cache
    times["numpy write+fsync"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        np.fromfile(os.path.join(directory, f"raw{i}.bin"), dtype=np.float32)
    times["numpy read"] = time.perf_counter() - start
    tensor = torch.from_numpy(block)
    start = time.perf_counter()
    for i in range(n):
        save_file({"w": tensor}, os.path.join(directory, f"st{i}.safetensors"))
    times["safetensors write"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        load_file(os.path.join(directory, f"st{i}.safetensors"))
    times["safetensors read"] = time.perf_counter() - start
    from megatron_emu.direct_io import DirectFile

    start = time.perf_counter()
    for i in range(n):
        with DirectFile(os.path.join(directory, f"direct{i}.bin")) as f:
            f.write(tensor)
    times["DirectFile write+fsync"] = time.perf_counter() - start
    times["bytes"] = n * block.nbytes
    return times


def set_cached(path: str, cached: bool) -> None:
    """Read every file under `path` into the page cache, or drop its (clean) pages from it."""
    buffer = bytearray(64 * 2**20)
    for d, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                if cached:
                    while os.readv(fd, [buffer]):
                        pass
                else:
                    os.fsync(fd)  # clean pages only can be dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run_child(*args: str) -> dict:
    """Run one phase in a fresh interpreter; its JSON result plus wall seconds and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "megatron_emu.convert.benchmark", "--child", *args],
                            stdout=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"phase {args[0]} failed (status {status})")
    result = json.loads(output.decode().strip().splitlines()[-1])
    result["wall s (process)"] = time.perf_counter() - start
    result["peak RSS GB"] = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    result["cpu s (process)"] = usage.ru_utime + usage.ru_stime  # less disturbed than wall time on a busy machine
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--workdir", default="/tmp/convert-benchmark")
    p.add_argument("--shard", default=1, type=float, help="GiB per shard / import group")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep WORKDIR/ckpt from an earlier run (skip make)")
    p.add_argument("--phases", default="export,import,raw", help="which of export, import, raw to run")
    p.add_argument("--child", nargs="+")
    args = p.parse_args(argv)
    shard = int(args.shard * GiB)
    if args.child:
        kind, *rest = args.child
        fn = {"export": lambda: child_export(rest[0], rest[1], shard, args.preset), "import": lambda: child_import(rest[0], rest[1], args.preset, shard),
              "make": lambda: child_make(rest[0], args.preset), "raw": lambda: child_raw(rest[0], int(rest[1]), shard)}[kind]
        print(json.dumps(fn()))
        return
    w = args.workdir
    paths = {k: os.path.join(w, k) for k in ("ckpt", "hf", "back", "raw")}
    for key, path in paths.items():
        if not (key == "ckpt" and args.reuse):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path)
    os.makedirs(w, exist_ok=True)
    report = {"preset": args.preset, "shard GiB": args.shard}
    if not args.reuse:
        report["make"] = run_child("make", paths["ckpt"])
    report["checkpoint bytes"] = directory_bytes(paths["ckpt"])
    for phase, source, target in (("export", "ckpt", "hf"), ("import", "hf", "back")):
        if phase not in args.phases.split(","):
            continue
        for state in ("cold", "warm"):
            shutil.rmtree(paths[target], ignore_errors=True)
            set_cached(paths[source], state == "warm")
            report[f"{phase} ({state} input)"] = result = run_child(phase, paths[source], paths[target])
            result["bytes"] = directory_bytes(paths[target])
    if "raw" in args.phases.split(","):
        report["raw"] = run_child("raw", paths["raw"], str(report["checkpoint bytes"]))
    print(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(w)


if __name__ == "__main__":
    main()
