"""Cache builds that several ranks may start at once (torchrun on an empty cache).

Two layers: an exclusive file lock, so one process builds while the others wait and then
find the result; and atomic publication (build under a temporary name in the same
directory, os.replace into place, completion marker last), so that a reader never sees a
half-written file even where file locks do not work (some network file systems).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import warnings

import xxhash


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive lock on `path` (created if needed) for the duration of the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on a file system without locks
            warnings.warn(f"{path}: file locking unavailable ({e}); relying on atomic renames only")
        yield  # released when the file is closed


def publish(src_prefix: str, dst_prefix: str, suffixes: tuple[str, ...]) -> None:
    """Move src_prefix+suffix -> dst_prefix+suffix for each suffix, in order (the last one
    is the completion marker readers check)."""
    for suffix in suffixes:
        if os.path.exists(src_prefix + suffix):
            os.replace(src_prefix + suffix, dst_prefix + suffix)


def default_cache_dir() -> str:
    """Where built caches go (tiny tokenizer, synthetic corpus, plans of read-only datasets)."""
    return os.environ.get("MEGATRON_EMU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_emu")


def sidecar_base(prefix: str, cache_dir: str = "") -> str:
    """Where files derived from dataset `prefix` go (plans, verification stamps): beside it,
    or, when its directory is not writable, under `<cache_dir>/plans/<name>-<hash of its path>`."""
    if os.access(os.path.dirname(os.path.abspath(prefix)), os.W_OK):
        return prefix
    where = xxhash.xxh3_64_hexdigest(os.path.abspath(prefix).encode())[:8]
    base = os.path.join(cache_dir or default_cache_dir(), "plans", f"{os.path.basename(prefix)}-{where}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    return base
