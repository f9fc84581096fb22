"""Plans (data/plans.py) cached as memory-mapped arrays beside the dataset.

Every rank and DataLoader worker of a node maps the same file, so a plan costs its pages
once per node and nothing at start-up once it exists (Megatron caches its sample indices
the same way). One file per plan NAME and key hash H, `<prefix>.plan-NAME-H.bin`:

    HEADER_BYTES of text (space-padded): line 1 the key (one line of JSON), line 2
      {"rows": R, "checksum": C}, C a sampled checksum of the rows
    the rows: int64, C order (page-aligned after the header, so they map in place)

or, when the dataset's directory is not writable, the same name under
`<cache_dir>/plans/<dataset name>-<hash of its path>`. The key holds what the plan depends
on: the identities (inode, size, mtime, ctime) of the .idx and of the dataset's .json
(which names the tokenizer), and the plan's parameters (--seq-length, tokens per image,
max images, ...). A changed key is another file name, so a stale plan is never read; a
plan whose rows do not match its header (truncation, corruption in a sampled piece) is
rebuilt, not trusted. A warm start is two stat calls and one open (the file beside the
dataset is tried first, so no writability check), a byte comparison of the key line and a
small parse; a plan of at most IN_MEMORY_BYTES is read whole (the read serves checksum and
array) instead of mapped.

One process builds, under the file lock of data/locks.py, while the others wait; the build
reads the .idx in blocks of documents (bounded memory) and writes under a temporary name,
published by one atomic rename: a killed build leaves no file that looks complete.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import warnings
from typing import Callable

import numpy as np
import xxhash

from megatron_emu.data.idx_file import IdxFile
from megatron_emu.data.locks import file_lock, sidecar_base

FORMAT = "megatron_emu.plan.v3"
HEADER_BYTES = 4096
DOCS_PER_BLOCK = 1 << 14  # its item arrays stay in cache: ~2.5x faster than 2^18 per document
PIECE, PIECES = 1 << 20, 16  # the checksum reads at most 16 MiB, whatever the plan's size
IN_MEMORY_BYTES = 1 << 20  # a plan this small is read whole (one read serves checksum and array), not mapped


def file_identity(prefix: str) -> str:
    """The identities (inode, size, mtime, ctime) of the .idx and the .json of dataset `prefix`,
    as the key's JSON fields. File identities rather than contents: any rewrite of either file
    changes its ctime, and this costs two stat calls, not a read. MultimodalIndexed takes it
    when it opens the dataset, so a plan is keyed by the files it actually mapped."""
    idx, meta = os.stat(prefix + ".idx"), os.stat(prefix + ".json")
    return (f'"idx": [{idx.st_ino}, {idx.st_size}, {idx.st_mtime_ns}, {idx.st_ctime_ns}], '
            f'"dataset_json": [{meta.st_ino}, {meta.st_size}, {meta.st_mtime_ns}, {meta.st_ctime_ns}]')


def plan_key(identity: str, name: str, params: dict, width: int) -> str:
    """One line of JSON: what the plan depends on (params in the caller's order). The header's
    first line is exactly this text, so a warm start compares bytes instead of parsing JSON."""
    return f'{{"format": "{FORMAT}", "plan": "{name}", "width": {width}, "params": {json.dumps(params)}, {identity}}}'


def plan_file(base: str, name: str, key: str) -> str:
    """`base` is the dataset prefix, or its stand-in under the cache dir (locks.sidecar_base)."""
    return f"{base}.plan-{name}-{xxhash.xxh3_64_hexdigest(key.encode())}.bin"


def header(key: str, rows: int, checksum: str) -> bytes:
    """Line 1: the key; line 2: rows and checksum; spaces up to HEADER_BYTES."""
    return f'{key}\n{{"rows": {rows}, "checksum": "{checksum}"}}\n'.encode()


def rows_checksum(size: int, pieces) -> str:
    """xxh3 of the rows' byte count and the given pieces of them (the header's checksum)."""
    h = xxhash.xxh3_64(str(size).encode())
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def sampled_checksum(fd: int, offset: int, size: int) -> str:
    """rows_checksum of the `size` bytes of open file `fd` from `offset`: all of them up to
    16 MiB, else 16 evenly spaced 1 MiB pieces (a bounded read, whatever the plan's size)."""
    if size <= PIECE * PIECES:
        return rows_checksum(size, [os.pread(fd, size, offset)])
    return rows_checksum(size, (os.pread(fd, PIECE, offset + k * (size - PIECE) // (PIECES - 1))
                                for k in range(PIECES)))


def _load(path: str, key: str, width: int) -> tuple[np.ndarray | None, str]:
    """(the cached plan, "") or (None, why it cannot be used)."""
    try:
        fd = os.open(path, os.O_RDONLY)  # os.read: one system call, no file object
    except FileNotFoundError:
        return None, "missing"
    try:
        size = os.fstat(fd).st_size - HEADER_BYTES
        whole = os.read(fd, HEADER_BYTES + size if size <= IN_MEMORY_BYTES else HEADER_BYTES)
        first_line = key.encode() + b"\n"
        if not whole.startswith(first_line):
            return None, "described with another key"
        try:
            counts = json.loads(whole[len(first_line):whole.index(b"\n", len(first_line))])
            rows, expected = int(counts["rows"]), counts["checksum"]
        except (ValueError, KeyError, TypeError) as e:
            return None, f"unreadable header ({type(e).__name__})"
        if size != rows * width * 8:
            return None, f"has {size} bytes of rows, its header says {rows * width * 8} (truncated or replaced)"
        if size <= IN_MEMORY_BYTES:
            checksum = rows_checksum(size, [memoryview(whole)[HEADER_BYTES:]])  # the read serves both
        else:
            checksum = sampled_checksum(fd, HEADER_BYTES, size)
    finally:
        os.close(fd)
    if checksum != expected:
        return None, "checksum mismatch (corrupt)"
    if size <= IN_MEMORY_BYTES:
        return np.frombuffer(whole, dtype=np.int64, offset=HEADER_BYTES).reshape(rows, width), ""
    return np.memmap(path, dtype=np.int64, mode="r", offset=HEADER_BYTES, shape=(rows, width)), ""


def cached_plan(prefix: str, name: str, params: dict, width: int,
                build_block: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                cache_dir: str = "", docs_per_block: int = DOCS_PER_BLOCK, identity: str = "") -> np.ndarray:
    """The plan of dataset `prefix`: (rows, width) int64, memory-mapped; built once by
    build_block(lengths, modes, doc_index) over blocks of documents when missing or stale.
    identity: file_identity(prefix) taken when the dataset was opened (else taken now)."""
    key = plan_key(identity or file_identity(prefix), name, params, width)
    # Beside the dataset first: a warm start then needs no writability check (access + abspath).
    beside = plan_file(prefix, name, key)
    plan, _ = _load(beside, key, width)
    if plan is not None:
        return plan
    path = plan_file(sidecar_base(prefix, cache_dir), name, key)  # where it is built: the cache dir if read-only
    if path != beside:
        plan, _ = _load(path, key, width)
        if plan is not None:
            return plan
    with file_lock(path + ".lock"):
        plan, problem = _load(path, key, width)  # another process may have built it meanwhile
        if plan is None:
            if problem != "missing":
                warnings.warn(f"{path}: {problem}; rebuilding the plan")
            _build(prefix, path, key, width, build_block, docs_per_block)
            plan, problem = _load(path, key, width)
    if plan is None:
        raise RuntimeError(f"{path}: a plan just built cannot be read back ({problem})")
    return plan


def _build(prefix, path, key, width, build_block, docs_per_block) -> None:
    """Called holding the plan's lock: a `.tmp<pid>` file already there is a killed builder's
    (a plan of 75M documents is gigabytes), removed before this one writes its own."""
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        os.remove(stale)
    idx = IdxFile.open(prefix + ".idx")
    tmp = f"{path}.tmp{os.getpid()}"
    rows = 0
    try:
        with open(tmp, "w+b") as f:
            f.write(b" " * HEADER_BYTES)  # filled in once the rows are known
            for lo in range(0, idx.num_documents, docs_per_block):
                block = build_block(*idx.block(lo, min(lo + docs_per_block, idx.num_documents)))
                np.ascontiguousarray(block, dtype=np.int64).tofile(f)
                rows += len(block)
            f.flush()
            head = header(key, rows, sampled_checksum(f.fileno(), HEADER_BYTES, rows * width * 8))
            if len(head) > HEADER_BYTES:
                raise ValueError(f"{path}: plan key too long for its {HEADER_BYTES}-byte header")
            f.seek(0)
            f.write(head.ljust(HEADER_BYTES))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(e.errno, f"{path}: no space left to write the sample plan ({rows:,} rows so far, "
                      f"{width * 8} bytes each); free space there, or give --data-cache-dir on a device "
                      f"with room") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    return MappedPlan(np.memmap(filename, dtype=np.int64, mode="r", offset=HEADER_BYTES, shape=shape))
