"""Write new files with O_DIRECT from two reused staging buffers, not through the page cache.

Why: on the dev VM a buffered write of a new file spends its time in the kernel getting
fresh page-cache pages (copy_folio_from_iter_atomic was 51-56% of the export and import
profiles) and is then throttled by dirty-page writeback: 0.5-1.2 GB/s with fsync, up to
1.8 s of CPU per GiB. O_DIRECT hands the disk our own buffers: 2.5-2.7 GB/s with fsync at
~0.03 s of CPU per GiB, measured on the same VM. The bytes on disk are the same; only the
path there changes. The cost: one memcpy into a staging buffer (resident memory, ~10
GB/s), overlapped with the previous buffer's write in a background thread.

O_DIRECT needs aligned offsets and lengths: every write is a whole staging buffer, the
last one padded to the block size, and the file is cut to its real length at close.
Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems) the same
aligned writes go through the page cache.

Inputs that are copied unchanged (a DCP item into a safetensors shard, a safetensors
tensor into a DCP item) are named by a FileSpan (file, offset, dtype, shape) instead of
being mapped, and `read_spans` reads them the same way: O_DIRECT into reused aligned
buffers, the next chunk read in a background thread while the current one is copied
into the writer's staging buffer. Why: a cold input read through the page cache (mmap
faults, safetensors' mapping) filled at 0.5-1.9 GB/s on the dev VM and was the largest
cost of a cold conversion; O_DIRECT reads ran at 2.8-3.2 GB/s there.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import mmap
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import xxhash

from megatron_emu.range_check import RangeCheck

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffer addresses (a page)
CHUNK = 8 * 2**20  # bytes per write: 8 MiB measured fastest here (2.3-2.7 GB/s; 16-128 MiB: 1.0-2.1)
# Buffers of read_spans (CHUNK each): reads go on while the caller waits for its writes.
# 2, 4 and 8 were within the noise of each other on the dev VM (cold import 5.0-6.3 s).
READ_AHEAD = 4

_pool_lock = threading.Lock()
_free_buffers: list[mmap.mmap] = []  # reused across files: fresh memory costs page faults


def _take_buffer() -> mmap.mmap:
    with _pool_lock:
        if _free_buffers:
            return _free_buffers.pop()
    # Anonymous, page-aligned, and private: Python's default MAP_SHARED would let processes
    # forked after a conversion (gloo test ranks) share the pooled buffers, and overwrite each other's reads.
    return mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _give_buffer(buffer: mmap.mmap) -> None:
    with _pool_lock:
        _free_buffers.append(buffer)


@dataclasses.dataclass(frozen=True)
class FileSpan:
    """A tensor's bytes as they lie in a file (C order, no copy made yet).

    It has the geometry a tensor has (dtype, shape, numel, element_size), so the writers
    can lay out headers and plan shards from it; DirectFile.write copies its bytes.
    """

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    check: RangeCheck | None = None  # verify the bytes against a recorded checksum as they are read

    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def rows(self, n: int) -> FileSpan:
        """The first n rows (a prefix of the bytes)."""
        return dataclasses.replace(self, shape=(min(n, self.shape[0]), *self.shape[1:]))

    def tensor(self) -> torch.Tensor:
        """The bytes read into a new tensor (for the conversions that change them)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        flat, done = out.reshape(-1).view(torch.uint8).numpy(), 0
        for piece in read_spans([self]):
            flat[done:done + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            done += len(piece)
        return out


class _File:
    """An input file: a buffered descriptor without readahead, and an O_DIRECT one where the
    filesystem allows it; `cached`: whether reads find its bytes in the page cache (None:
    not known yet)."""

    def __init__(self, path: str):
        self.path, self.cached, self.direct = path, None, None
        self.buffered = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.buffered, 0, 0, os.POSIX_FADV_RANDOM)  # a probe that misses reads one page only
        if hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise  # EINVAL: this filesystem has no O_DIRECT

    def close(self) -> None:
        for fd in (self.buffered, self.direct):
            if fd is not None:
                os.close(fd)


class _SpanReader:
    """Aligned reads of files: from the page cache while a file's bytes are found there (a
    warm input is copied from it faster than the disk reads it again), else with O_DIRECT
    (or through the page cache where a filesystem refuses O_DIRECT).

    Cache hits are asked for with RWF_NOWAIT, which fails with EAGAIN instead of waiting
    for the disk but still starts reading what it missed (into the page cache, then read
    again by O_DIRECT: measured to halve a cold import). So a file's first read probes one
    page (readahead is off on that descriptor), and after one miss the file is read with
    O_DIRECT only: inputs are usually all cached or all not.
    """

    def __init__(self):
        self.files: dict[str, _File] = {}

    def _file(self, path: str) -> _File:
        if path not in self.files:
            self.files[path] = _File(path)
        return self.files[path]

    def _from_cache(self, file: _File, view: memoryview, offset: int, needed: int) -> bool:
        """Whether the bytes were all in the page cache (then they are in `view` now)."""
        if file.cached is False or not hasattr(os, "RWF_NOWAIT"):
            return False
        try:
            if file.cached is None:
                file.cached = os.preadv(file.buffered, [view[:ALIGN]], offset, os.RWF_NOWAIT) > 0
            file.cached = file.cached and os.preadv(file.buffered, [view], offset, os.RWF_NOWAIT) >= needed
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here
            file.cached = False
        return file.cached

    @staticmethod
    def _from_disk(file: _File, view: memoryview, offset: int, needed: int) -> None:
        got = 0
        while got < needed:
            try:
                n = os.preadv(file.direct if file.direct is not None else file.buffered, [view[got:]], offset + got)
            except OSError as e:
                if not (file.direct is not None and e.errno == errno.EINVAL):
                    raise
                os.close(file.direct)  # the device wants another alignment: read through the page cache
                file.direct = None
                continue
            if n == 0:
                raise ValueError(f"{file.path}: truncated (bytes up to {offset + needed} needed, the file ends at {offset + got})")
            got += n

    def read(self, buffer: mmap.mmap, path: str, begin: int, end: int) -> memoryview:
        """Bytes [begin, end) of `path` (within one CHUNK-aligned block) as a view of `buffer`."""
        start = begin - begin % ALIGN
        view = memoryview(buffer)[:-(-(end - start) // ALIGN) * ALIGN]  # O_DIRECT: whole blocks
        file = self._file(path)
        if not self._from_cache(file, view, start, end - start):
            self._from_disk(file, view, start, end - start)
        return memoryview(buffer)[begin - start:end - start]

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()


def _pieces(span: FileSpan) -> Iterator[tuple[str, int, int]]:
    """(path, begin, end) of a span cut at multiples of CHUNK in the file: each piece's aligned
    read fits one buffer, and reads stay on the same grid whatever the span's offset."""
    begin, end = span.offset, span.offset + span.nbytes
    while begin < end:
        stop = min(end, (begin // CHUNK + 1) * CHUNK)
        yield span.path, begin, stop
        begin = stop


def read_spans(spans: Iterable[FileSpan]) -> Iterator[memoryview]:
    """The bytes of each span in turn, in pieces of at most CHUNK bytes (never across spans);
    each piece is valid until the next is asked for. A background thread reads up to
    READ_AHEAD - 1 pieces ahead into reused buffers, so the disk keeps reading while the
    caller waits for its writes. A span with a `check` is hashed by that thread as it reads
    (in order: one thread), and a mismatch is a ValueError raised before the span's last
    piece is handed out."""
    owners, pieces = [], []  # owners[i]: (span, first piece of it, last piece of it)
    for span in spans:
        cut = list(_pieces(span))
        owners += [(span, i == 0, i == len(cut) - 1) for i in range(len(cut))]
        pieces += cut
    if not pieces:
        return
    reader, buffers = _SpanReader(), [_take_buffer() for _ in range(READ_AHEAD)]
    pool, reads = ThreadPoolExecutor(max_workers=1), collections.deque()
    hasher = None

    def read_and_check(i: int) -> memoryview:
        nonlocal hasher
        view = reader.read(buffers[i % READ_AHEAD], *pieces[i])
        span, first, last = owners[i]
        if span.check is not None:
            hasher = span.check.begin(span) if first else hasher
            hasher.update(view)
            if last:
                span.check.end(hasher, span)
        return view

    def read(i: int) -> None:
        reads.append(pool.submit(read_and_check, i))

    try:
        for i in range(min(READ_AHEAD - 1, len(pieces))):
            read(i)
        for i in range(len(pieces)):
            view = reads.popleft().result()
            if i + READ_AHEAD - 1 < len(pieces):
                read(i + READ_AHEAD - 1)  # into the buffer of piece i - 1, which the caller is done with
            yield view
    finally:
        pool.shutdown(wait=True)  # a read in flight finishes before its buffer is reused
        reader.close()
        for buffer in buffers:
            _give_buffer(buffer)


class DirectFile:
    """A new file written sequentially (`write`, `tell`, `close`), data fsynced at close.

    With checksums=True the bytes are hashed (xxh3_64) as they are written: the whole file
    in the writer thread (`file_digest` after close), and in the caller's thread the bytes
    since the last `segment_digest()` call (a DCP item)."""

    def __init__(self, path: str, checksums: bool = False):
        self.path = path
        self.file_hash = xxhash.xxh3_64() if checksums else None
        self.segment_hash = xxhash.xxh3_64() if checksums else None
        self.direct = hasattr(os, "O_DIRECT")
        self.fd = self._open(truncate=True)
        self.buffers = [_take_buffer(), _take_buffer()]
        self.pending: list[Future | None] = [None, None]
        self.current, self.fill, self.flushed = 0, 0, 0  # buffer in use, bytes in it, bytes handed to the disk
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.closed = False

    def _open(self, truncate: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        if self.direct:
            try:
                return os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # the filesystem has no O_DIRECT
        return os.open(self.path, flags, 0o644)

    def _pwrite(self, buffer: mmap.mmap, length: int, offset: int, data_length: int) -> None:
        with memoryview(buffer) as whole:
            if self.file_hash is not None:  # the data, not the padding to the block size
                self.file_hash.update(whole[:data_length])
            view = whole[:length]
            while view:
                try:
                    n = os.pwrite(self.fd, view, offset)
                except OSError as e:
                    if not (self.direct and e.errno == errno.EINVAL):
                        raise
                    os.close(self.fd)  # the device wants another alignment: the page cache it is
                    self.direct = False
                    self.fd = self._open(truncate=False)
                    continue
                view, offset = view[n:], offset + n

    def tell(self) -> int:
        return self.flushed + self.fill

    def segment_digest(self) -> str:
        digest = self.segment_hash.hexdigest()
        self.segment_hash.reset()
        return digest

    def file_digest(self) -> str:
        return self.file_hash.hexdigest()

    def _flush(self, length: int) -> None:
        """Hand the current buffer to the writer thread and switch to the other one."""
        i = self.current
        self.pending[i] = self.writer.submit(self._pwrite, self.buffers[i], length, self.flushed, self.fill)
        self.flushed += self.fill
        self.current, self.fill = 1 - i, 0
        if self.pending[self.current] is not None:
            self.pending[self.current].result()  # its write is done: the buffer can be refilled
            self.pending[self.current] = None

    def write_pieces(self, pieces: Iterator[memoryview], nbytes: int) -> None:
        """Append the next `nbytes` bytes of `pieces` (an iterator from read_spans)."""
        while nbytes > 0:
            piece = next(pieces)
            self.write(piece)
            nbytes -= len(piece)

    def write(self, data) -> None:
        """Append bytes: a bytes-like object, the memory of a tensor (any dtype, any strides)
        or the bytes of a FileSpan (read with O_DIRECT; several spans in a row read ahead
        better through one read_spans iterator and write_pieces)."""
        if isinstance(data, FileSpan):
            with contextlib.closing(read_spans([data])) as pieces:
                self.write_pieces(pieces, data.nbytes)
            return
        if isinstance(data, torch.Tensor):
            source = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
        else:
            source = np.frombuffer(data, dtype=np.uint8)
        if self.segment_hash is not None:
            self.segment_hash.update(source)
        done, total = 0, len(source)
        while done < total:
            n = min(CHUNK - self.fill, total - done)
            # numpy's copy: one thread, GIL released (torch's copy_ wakes OpenMP workers that
            # then spin on the 2 cores the writer thread needs)
            np.frombuffer(self.buffers[self.current], dtype=np.uint8)[self.fill:self.fill + n] = source[done:done + n]
            self.fill += n
            done += n
            if self.fill == CHUNK:
                self._flush(CHUNK)

    def close(self) -> None:
        """Write the tail (padded to the block size, then cut), fsync, close."""
        if self.closed:
            return
        self.closed = True
        try:
            size = self.tell()
            if self.fill:
                padded = -(-self.fill // ALIGN) * ALIGN
                self._flush(padded)
            for future in self.pending:
                if future is not None:
                    future.result()
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop after an error: wait for the writer thread, release the buffers, keep nothing."""
        if self.closed:
            return
        self.closed = True
        self._release()

    def _release(self) -> None:
        self.writer.shutdown(wait=True)
        os.close(self.fd)
        for buffer in self.buffers:
            _give_buffer(buffer)
        self.buffers = []

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
