"""Checksums of a checkpoint's files: the record (`checksums.json`) and its verification.

    DIR/iter_0000100/checksums.json
      {"format": "megatron_emu.checksums/1", "algorithm": "xxh3_64",
       "files": {"__0_0.distcp": {"size": 123, "xxh3_64": "9f0c...",
                                  "items": [{"key": "model.llm.output.weight", "chunk": [0, 0],
                                             "offset": 0, "length": 4096, "xxh3_64": "..."}, ...]},
                 ".metadata": {"size": ..., "xxh3_64": ...}, "run_config.json": {...}}}

Each file's digest is computed while it is written (training/checksum_writer.py) and
covers every byte; each DCP item (one tensor, or one chunk of a sharded one, as torch.save
wrote it at [offset, offset + length) of its file) has its own digest too, so a file that
differs can be narrowed to the tensor that differs. xxh3_64 (the xxhash package) hashes
at ~20 GB/s on one core here, well above the disk's speed: verifying costs a read.

Who verifies: `Checkpointer.load` (each rank a share of the files, before DCP reads them),
the exporter (every model item as its bytes stream through: convert/streams.DCPSource) and
tools/verify_checkpoint.py (everything). A checkpoint without checksums.json (saved before
checksums existed) is accepted with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from megatron_emu.direct_io import FileSpan, read_spans
from megatron_emu.range_check import RangeCheck
from megatron_emu.files import read_json

log = logging.getLogger("megatron_emu")

CHECKSUMS_NAME = "checksums.json"
FORMAT = "megatron_emu.checksums/1"
ALGORITHM = "xxh3_64"


def new_hasher():
    return xxhash.xxh3_64()


def item_label(item: dict) -> str:
    """How an error names a DCP item: the tensor, and the chunk when it is one of several."""
    chunk = item.get("chunk") or []
    return item["key"] + (f" (chunk at {chunk})" if any(chunk) else "")


def read_checksums(directory: str) -> dict | None:
    """The checkpoint's checksum record; None when it has none (saved without checksums)."""
    path = os.path.join(directory, CHECKSUMS_NAME)
    if not os.path.exists(path):
        return None
    record = read_json(path, "unreadable checksum record")
    if record.get("format") != FORMAT or record.get("algorithm") != ALGORITHM:
        raise ValueError(f"{path}: format {record.get('format')!r} / {record.get('algorithm')!r}, expected {FORMAT!r} / {ALGORITHM!r}")
    return record


def warn_unverified(directory: str) -> None:
    log.warning("%s: no %s (saved before checksums existed): its bytes are not verified", directory, CHECKSUMS_NAME)


def item_entry(index, offset: int, length: int, digest: str) -> dict:
    """The record of one DCP item (`index`: its MetadataIndex) at [offset, offset + length)."""
    chunk = list(index.offset) if index.offset is not None else []
    return {"key": index.fqn, "chunk": chunk, "offset": offset, "length": length, ALGORITHM: digest}


def write_record(directory: str, files: dict[str, dict]) -> None:
    """checksums.json for `files` (name -> {"size", "xxh3_64", "items"}: digests taken as the
    writer wrote them) and every other file in `directory`: small ones written before the
    record (run_config.json), hashed now from the page cache."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name not in files and name != CHECKSUMS_NAME and os.path.isfile(path):
            size = os.path.getsize(path)
            files[name] = {"size": size, ALGORITHM: hash_range(path, 0, size)}
    for entry in files.values():
        entry.get("items", []).sort(key=lambda item: item["offset"])
    record = {"format": FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    with open(os.path.join(directory, CHECKSUMS_NAME), "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def hash_range(path: str, offset: int, length: int, progress: Callable[[int], None] | None = None) -> str:
    """xxh3_64 of bytes [offset, offset + length) of `path`, read with O_DIRECT (or from the
    page cache when they are there: direct_io.read_spans)."""
    hasher = new_hasher()
    for piece in read_spans([FileSpan(path, offset, torch.uint8, (length,))]):
        hasher.update(piece)
        if progress is not None:
            progress(len(piece))
    return hasher.hexdigest()


def item_checks(record: dict, prefix: str = "") -> dict[tuple[str, tuple], RangeCheck]:
    """(fqn, chunk offsets) -> the recorded checksum of that DCP item, for keys under `prefix`
    (what the exporter's reader verifies as it reads the items)."""
    return {(item["key"], tuple(item["chunk"])): RangeCheck(item["offset"], item["length"], item[ALGORITHM], item_label(item))
            for entry in record["files"].values() for item in entry.get("items", []) if item["key"].startswith(prefix)}


def _first_bad_item(path: str, items: list[dict]) -> dict | None:
    for item in items:
        if hash_range(path, item["offset"], item["length"]) != item["xxh3_64"]:
            return item
    return None


def verify_file(directory: str, name: str, expected: dict, progress: Callable[[int], None] | None = None) -> None:
    """One file against its record: a ValueError naming the file (and the tensor) otherwise."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        kind = "shard" if name.endswith(".distcp") else "file"
        raise ValueError(f"{directory}: {kind} {name} is missing (listed in {CHECKSUMS_NAME}; the checkpoint was not copied completely)")
    size = os.path.getsize(path)
    if size != expected["size"]:
        raise ValueError(f"{path}: {size} bytes, {CHECKSUMS_NAME} records {expected['size']} (truncated or overwritten)")
    if hash_range(path, 0, size, progress) == expected["xxh3_64"]:
        return
    bad = _first_bad_item(path, expected.get("items", []))
    where = f" in tensor {item_label(bad)} (bytes {bad['offset']}-{bad['offset'] + bad['length']})" if bad else ""
    raise ValueError(f"{path}: checksum mismatch{where}: the checkpoint is corrupted")


def verify_directory(directory: str, record: dict, progress: Callable[[int], None] | None = None, jobs: int = 2) -> list[str]:
    """Every file of the record, `jobs` at a time (the reads and xxhash release the GIL);
    returns one error line per file that differs, [] when all match."""
    def check(name: str) -> str | None:
        try:
            verify_file(directory, name, record["files"][name], progress)
        except ValueError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [e for e in pool.map(check, sorted(record["files"])) if e]


def total_bytes(record: dict, names: list[str] | None = None) -> int:
    files = record["files"]
    return sum(files[n]["size"] for n in (files if names is None else names))


def share(record: dict, rank: int, world_size: int) -> list[str]:
    """The files `rank` verifies: biggest first to the least loaded rank, so every rank reads
    about the same number of bytes."""
    load = [0] * world_size
    mine = []
    for name in sorted(record["files"], key=lambda n: (-record["files"][n]["size"], n)):
        owner = load.index(min(load))
        load[owner] += record["files"][name]["size"]
        if owner == rank:
            mine.append(name)
    return mine


def verify_for_load(directory: str, process_group=None) -> None:
    """Before `--load` reads a checkpoint: every rank verifies its share of the files, and all
    ranks raise the same one-line error if any share failed."""
    import torch.distributed as dist

    record = read_checksums(directory)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(process_group), dist.get_world_size(process_group)) if distributed else (0, 1)
    if record is None:
        if rank == 0:
            warn_unverified(directory)
        return
    error = None
    try:
        for name in share(record, rank, world):
            verify_file(directory, name, record["files"][name])
    except ValueError as e:
        error = str(e)
    errors = [error]
    if distributed:
        errors = [None] * world
        dist.all_gather_object(errors, error, group=process_group)
    failed = [e for e in errors if e]
    if failed:
        raise ValueError(failed[0])
    if rank == 0:
        log.info("verified %d checkpoint files (%.2f GB) of %s", len(record["files"]), total_bytes(record) / 1e9, directory)
