"""Plans (data/plans.py) cached as memory-mapped arrays beside the dataset.

Every rank and DataLoader worker of a node maps the same file, so a plan costs its pages
once per node and nothing at start-up once it exists (Megatron caches its sample indices
the same way). Files, for plan NAME and key hash H:

    <prefix>.plan-NAME-H.bin    int64 rows, C order
    <prefix>.plan-NAME-H.json   the key, shape, byte count and a sampled checksum

or, when the dataset's directory is not writable, the same names under
`<cache_dir>/plans/<dataset name>-<hash of its path>`. The key holds what the plan depends
on: the .idx file's identity (size and modification time), the dataset's .json (tokenizer
fingerprint, file sizes, any checksums), and the plan's parameters (--seq-length, tokens
per image, max images, ...). A changed key is another file name, so a stale plan is never
read; a plan whose .bin does not match its .json (killed build, truncation, corruption in
a sampled piece) is rebuilt, not trusted.

One process builds, under the file lock of data/locks.py, while the others wait; the build
reads the .idx in blocks of documents (bounded memory), writes under a temporary name and
publishes .bin then .json (the completion marker) with atomic renames.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Callable

import numpy as np
import xxhash

from megatron_emu.data.idx_file import IdxFile
from megatron_emu.data.locks import file_lock, sidecar_base

FORMAT = "megatron_emu.plan.v1"
DOCS_PER_BLOCK = 1 << 14  # its item arrays stay in cache: ~2.5x faster than 2^18 per document
PIECE, PIECES = 1 << 20, 16  # the checksum reads at most 16 MiB, whatever the plan's size


def plan_key(prefix: str, name: str, params: dict) -> dict:
    st = os.stat(prefix + ".idx")
    with open(prefix + ".json", "rb") as f:
        dataset = xxhash.xxh3_64_hexdigest(f.read())
    return {"format": FORMAT, "plan": name, "params": params, "idx_bytes": st.st_size,
            "idx_mtime_ns": st.st_mtime_ns, "dataset_json_xxh3": dataset}


def plan_path(prefix: str, name: str, key: dict, cache_dir: str) -> str:
    """Path without extension: beside the dataset, or under cache_dir if that is read-only."""
    digest = xxhash.xxh3_64_hexdigest(json.dumps(key, sort_keys=True).encode())
    return f"{sidecar_base(prefix, cache_dir)}.plan-{name}-{digest}"


def sampled_checksum(path: str, size: int) -> str:
    """xxh3 of 16 evenly spaced 1 MiB pieces (all of a file up to 16 MiB) and the size."""
    h = xxhash.xxh3_64(str(size).encode())
    with open(path, "rb") as f:
        if size <= PIECE * PIECES:
            h.update(f.read())
        else:
            for k in range(PIECES):
                f.seek(k * (size - PIECE) // (PIECES - 1))
                h.update(f.read(PIECE))
    return h.hexdigest()


def _problem(path: str, key: dict, width: int) -> str | None:
    """Why the cached plan at `path` cannot be used (None: it can)."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        rows = int(meta["rows"])
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable description ({type(e).__name__})"
    if meta.get("key") != key or meta.get("width") != width:
        return "described with another key"
    size = os.path.getsize(path + ".bin") if os.path.exists(path + ".bin") else -1
    if size != rows * width * 8:
        return f"has {size} bytes, its description says {rows * width * 8} (truncated or replaced)"
    if sampled_checksum(path + ".bin", size) != meta.get("checksum"):
        return "checksum mismatch (corrupt)"
    return None


def _open(path: str, width: int) -> np.ndarray:
    rows = os.path.getsize(path + ".bin") // (8 * width)
    if rows == 0:
        return np.zeros((0, width), dtype=np.int64)
    return np.memmap(path + ".bin", dtype=np.int64, mode="r", shape=(rows, width))


def cached_plan(prefix: str, name: str, params: dict, width: int,
                build_block: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                cache_dir: str = "", docs_per_block: int = DOCS_PER_BLOCK) -> np.ndarray:
    """The plan of dataset `prefix`: (rows, width) int64, memory-mapped; built once by
    build_block(lengths, modes, doc_index) over blocks of documents when missing or stale."""
    key = plan_key(prefix, name, params)
    path = plan_path(prefix, name, key, cache_dir)
    if _problem(path, key, width) is None:
        return _open(path, width)
    with file_lock(path + ".lock"):
        problem = _problem(path, key, width)  # another process may have built it meanwhile
        if problem is not None:
            if problem != "missing":
                warnings.warn(f"{path}.bin: {problem}; rebuilding the plan")
            _build(prefix, path, key, width, build_block, docs_per_block)
    return _open(path, width)


def _build(prefix, path, key, width, build_block, docs_per_block) -> None:
    idx = IdxFile.open(prefix + ".idx")
    tmp = f"{path}.tmp{os.getpid()}"
    rows = 0
    try:
        with open(tmp + ".bin", "wb") as f:
            for lo in range(0, idx.num_documents, docs_per_block):
                block = build_block(*idx.block(lo, min(lo + docs_per_block, idx.num_documents)))
                np.ascontiguousarray(block, dtype=np.int64).tofile(f)
                rows += len(block)
            f.flush()
            os.fsync(f.fileno())
        meta = {"key": key, "width": width, "rows": rows,
                "checksum": sampled_checksum(tmp + ".bin", rows * width * 8)}
        with open(tmp + ".json", "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp + ".bin", path + ".bin")
        os.replace(tmp + ".json", path + ".json")  # last: the completion marker
    finally:
        for ext in (".bin", ".json"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)


class MappedPlan:
    """Pickles as its file name (a memmap would pickle its whole contents), so DataLoader
    workers started with spawn / forkserver map the same file instead of receiving a copy."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        if isinstance(self.array, np.memmap):
            return _remap, (self.array.filename, self.array.shape)
        return MappedPlan, (np.asarray(self.array),)


def _remap(filename: str, shape: tuple) -> MappedPlan:
    return MappedPlan(np.memmap(filename, dtype=np.int64, mode="r", shape=shape))
