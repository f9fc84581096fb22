"""xxh3_64 checksums of a dataset's .bin and .idx, recorded in its .json.

xxh3 (package xxhash) hashes at memory speed, but a LAION-2B-sized .idx is ~70 GB: hashing
it in every rank and DataLoader worker at every start would cost minutes each. So the .idx
is hashed once, and a verification stamp records the file's identity (inode, size, mtime,
ctime) next to the digest; an open whose file still has that identity trusts the stamp.
Any write to the file (even one that restores its mtime) changes its ctime, so a modified
.idx is hashed again and refused. What a stamp cannot see is corruption below the file
system (media errors); tools/validate_data.py ignores stamps and re-reads everything,
.bin included. The .bin is hashed while it is written, at no second read.
"""

from __future__ import annotations

import contextlib
import json
import os

import xxhash

from megatron_emu.data.locks import file_lock

CHUNK_BYTES = 16 << 20


class HashingWriter:
    """A binary file opened for writing whose bytes are hashed as they are written
    (stands in for megatron-core's builder.data_file: it only calls write and close)."""

    def __init__(self, file):
        self.file, self.hash = file, xxhash.xxh3_64()
        self.part = None  # while copying a part: that part's own hash, to check it on the way

    def write(self, data) -> int:
        self.hash.update(data)
        if self.part is not None:
            self.part.update(data)
        return self.file.write(data)

    def flush(self) -> None:  # torch.save into this file flushes it at the end
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def file_xxh3(path: str, progress=None) -> str:
    """Streaming xxh3_64 of a file; progress: None or a callable(bytes read)."""
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


_VERIFIED: set[tuple] = set()  # (path, identity...) already checked in this process


def verify_file(path: str, expected: str, stamp: str | None = None) -> None:
    """Refuse `path` (one line naming it) unless its xxh3_64 is `expected`. An unchanged file
    is hashed once per process, and, given a `stamp` path, once for every process that sees
    the stamp (one process hashes under the stamp's lock while the others wait)."""
    identity = file_identity(path, expected)
    key = (os.path.abspath(path), *identity.values())
    if key in _VERIFIED:
        return
    if stamp is None or _read_stamp(stamp) != identity:
        with file_lock(stamp + ".lock") if stamp else contextlib.nullcontext():
            if stamp is None or _read_stamp(stamp) != identity:  # another process may have verified it
                actual = file_xxh3(path)
                if actual != expected:
                    raise ValueError(f"{path}: checksum xxh3_64 {actual} differs from {expected} recorded in the "
                                     "dataset's .json (corrupted, or a file from another dataset)")
                if stamp is not None:
                    _write_stamp(stamp, identity)
    _VERIFIED.add(key)


def file_identity(path: str, digest: str) -> dict:
    st = os.stat(path)
    return {"xxh3": digest, "inode": st.st_ino, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _read_stamp(stamp: str) -> dict | None:
    try:
        with open(stamp) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # missing or damaged: hash again


def _write_stamp(stamp: str, identity: dict) -> None:
    tmp = f"{stamp}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(identity, f)
        os.replace(tmp, stamp)
    except OSError:  # nowhere to write it: every process keeps hashing, as before stamps
        with contextlib.suppress(OSError):
            os.remove(tmp)
