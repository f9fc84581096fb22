#!/usr/bin/env python
"""What checkpoint checksums cost: dcp.save with and without hashing, and the load-time
verification next to the load itself, on a synthetic state dict.

  python tools/benchmark_checksums.py --gib 4 --repeats 3 --workdir /tmp/ckbench
  python tools/benchmark_checksums.py --exporter-reads CKPT --repeats 4

Run bare it measures a quick 0.25 GiB once (seconds; the page cache hides the disk at that
size); BENCHMARKS.md's figures give --gib and --repeats.

Each repeat saves the same state with dcp.FileSystemWriter (plain) and ChecksummingWriter
(hashes as it writes, + checksums.json), in alternating order, fsync on as in training;
then times verification (training/checksums.verify_for_load, one process) and dcp.load of
the checksummed copy, with its files dropped from the page cache first ("cold") and read
into it first ("warm"). Prints one JSON object (seconds; GB/s over the checkpoint's bytes).
"""

import argparse
import json
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from megatron_emu.convert.benchmark import directory_bytes, set_cached  # noqa: E402
from megatron_emu.training.checksum_writer import ChecksummingWriter  # noqa: E402
from megatron_emu.training.checksums import verify_for_load  # noqa: E402

TENSOR_BYTES = 64 * 2**20


def synthetic_state(gib: float) -> dict:
    count = max(1, int(gib * 2**30 // TENSOR_BYTES))
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layers.{i}.weight": torch.randn(TENSOR_BYTES // 4, generator=g) for i in range(count)}}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def exporter_reads(checkpoint: str, repeats: int) -> dict:
    """The exporter's read path alone: every model tensor stored whole, read as FileSpans
    through read_spans with its checksum verified on the way and without (checks dropped),
    alternating; warm page cache. Wall and CPU seconds (process_time: both threads)."""
    import dataclasses

    from megatron_emu.direct_io import read_spans
    from megatron_emu.convert.streams import DCPSource

    source = DCPSource(checkpoint)
    with_check = [s for s in source.read(list(source.entries), spans=True).values() if hasattr(s, "check")]
    without = [dataclasses.replace(s, check=None) for s in with_check]
    set_cached(source.path, True)
    times: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for kind, spans in (("verified", with_check), ("unverified", without))[:: 1 if repeat % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in read_spans(spans):
                pass
            times.setdefault(f"read spans {kind} wall s", []).append(round(time.perf_counter() - wall, 2))
            times.setdefault(f"read spans {kind} cpu s", []).append(round(time.process_time() - cpu, 2))
    times["span bytes"] = sum(s.nbytes for s in with_check)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=0.25, help="size of the synthetic state (BENCHMARKS.md: 2)")
    p.add_argument("--repeats", type=int, default=1, help="each measurement this many times (BENCHMARKS.md: 3)")
    p.add_argument("--workdir", default="/tmp/checksum-benchmark")
    p.add_argument("--exporter-reads", metavar="CKPT", help="instead: time the exporter's span reads of CKPT with and without verification")
    args = p.parse_args(argv)
    if args.exporter_reads:
        print(json.dumps(exporter_reads(args.exporter_reads, args.repeats)))
        return
    warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
    state = synthetic_state(args.gib)
    paths = {kind: os.path.join(args.workdir, kind) for kind in ("plain", "checksummed")}
    writers = {"plain": dcp.FileSystemWriter, "checksummed": ChecksummingWriter}
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for kind in (("plain", "checksummed") if repeat % 2 == 0 else ("checksummed", "plain")):
            shutil.rmtree(paths[kind], ignore_errors=True)
            seconds = timed(lambda: dcp.save(state, storage_writer=writers[kind](paths[kind]), no_dist=True))
            times.setdefault(f"save {kind}", []).append(seconds)
        target = {"model": {n: torch.empty_like(t) for n, t in state["model"].items()}}
        for cache in ("cold", "warm"):
            set_cached(paths["checksummed"], cache == "warm")
            times.setdefault(f"verify ({cache})", []).append(timed(lambda: verify_for_load(paths["checksummed"])))
            set_cached(paths["checksummed"], cache == "warm")
            load = lambda: dcp.load(target, storage_reader=dcp.FileSystemReader(paths["checksummed"]), no_dist=True)  # noqa: E731
            times.setdefault(f"dcp.load ({cache})", []).append(timed(load))
    nbytes = directory_bytes(paths["checksummed"])
    report = {"bytes": nbytes, "torch": torch.__version__}
    report.update({k: {"s": [round(s, 2) for s in v], "GB/s": [round(nbytes / s / 1e9, 2) for s in v]} for k, v in times.items()})
    print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in report.items()) + "\n}")
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
