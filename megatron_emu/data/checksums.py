"""xxh3_64 checksums of a dataset's .bin and .idx, recorded in its .json.

xxh3 (package xxhash) hashes at memory speed (BENCHMARKS.md), so the .idx is verified at
every open and the .bin, hashed while it is written, costs no second read at preprocess
time; tools/validate_data.py re-reads the .bin.
"""

from __future__ import annotations

import os

import xxhash

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


_VERIFIED: set[tuple] = set()  # (path, inode, size, mtime_ns, digest) already checked in this process


def verify_file(path: str, expected: str) -> None:
    """Refuse `path` (one line naming it) unless its xxh3_64 is `expected`; each unchanged
    file is hashed once per process (train and validation splits open the same prefix)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    actual = file_xxh3(path)
    if actual != expected:
        raise ValueError(f"{path}: checksum xxh3_64 {actual} differs from {expected} recorded in the dataset's "
                         ".json (corrupted, or a file from another dataset)")
    _VERIFIED.add(key)
