"""Tensors of a DCP checkpoint read straight from its files: one copy per chunk, or none.

DCP's FileSystemReader torch.load()s every stored item, so the bytes go file -> a fresh
storage -> the destination tensor, and every fresh buffer is paid for again in page
faults (on the 2-core dev VM, filling fresh memory runs at ~1-2 GB/s, copying between
resident buffers at ~10 GB/s). Here each item (the zip torch.save wrote, at an offset
of a .distcp file) is opened for its pickled tensor geometry only (torch.load with
map_location="meta" reads no data and reports where the storage bytes start), and those
bytes are memory-mapped where they lie:
  - a tensor stored in one piece (saved from one process, or replicated) comes back as
    a view of the mapping, no copy: its consumer (the safetensors writer) reads the page
    cache directly;
  - a tensor stored in chunks (TP / FSDP shards, several items) is assembled into one
    new tensor, one copy per chunk, at the chunk offsets the metadata gives.
Items with a recorded checksum (checksums.json) are verified as they are read: a span
carries its item's check into read_spans, a mapped item is hashed through its mapping.
Mappings are private (copy-on-write): writing to a returned tensor never changes the
checkpoint. Conversions that copy a whole-stored tensor unchanged ask for its `span`
instead (file, offset, geometry) and read it with O_DIRECT (direct_io.py). Items this cannot read (stream transforms such as compression, anything
that is not a torch.save zip) are reported as None, and the caller uses dcp.load.
"""

from __future__ import annotations

import io
import mmap
import os

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from megatron_emu.direct_io import FileSpan
from megatron_emu.range_check import RangeCheck, verify_mapped


_RECORDS = 8192  # bytes at each end of a torch.save zip holding its records (pickle, central directory)


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable stream (for torch.load)."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        got = os.preadv(self.fd, [memoryview(buffer)[:n]], self.offset + self.pos) if n else 0
        self.pos += got
        return got


def _mapped(fd: int, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """`nbytes` at file offset `start` as a 1-D tensor of `dtype` over a private mapping."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(fd, start + nbytes - base, access=mmap.ACCESS_COPY, offset=base)
    if hasattr(mmap, "MADV_WILLNEED"):
        region.madvise(mmap.MADV_WILLNEED)  # start the readahead now (cold cache); the reader faults later
    # frombuffer keeps `region` alive as long as the tensor (or a view of it) lives.
    return torch.frombuffer(region, dtype=dtype, count=nbytes // dtype.itemsize, offset=start - base)


class DirectReader:
    """Read global tensors of one DCP checkpoint directory; use as a context manager."""

    def __init__(self, directory: str, metadata: Metadata, checks: dict[tuple, RangeCheck] | None = None):
        self.directory = directory
        self.metadata = metadata
        self.checks = checks or {}  # (fqn, chunk offsets) -> the item's recorded checksum
        self.fds: dict[str, int] = {}

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)  # the mappings stay valid (mmap holds its own descriptor)
        self.fds.clear()

    def _fd(self, relative_path: str) -> int:
        if relative_path not in self.fds:
            self.fds[relative_path] = os.open(os.path.join(self.directory, relative_path), os.O_RDONLY)
        return self.fds[relative_path]

    def prefetch(self, fqns: list[str]) -> None:
        """Start reading every item's zip records (its first and last pages) now, all at once:
        torch.load reads them in small reads one after the other, each a wait for the disk
        when the checkpoint is not in the page cache."""
        for fqn in fqns:
            for chunk in getattr(self.metadata.state_dict_metadata[fqn], "chunks", ()):
                info = self.metadata.storage_data.get(MetadataIndex(fqn, chunk.offsets))
                if info is not None:
                    fd = self._fd(info.relative_path)
                    for start in {info.offset, max(info.offset, info.offset + info.length - _RECORDS)}:
                        os.posix_fadvise(fd, start, _RECORDS, os.POSIX_FADV_WILLNEED)

    def _locate(self, index: MetadataIndex) -> tuple[int, int, torch.Tensor] | None:
        """(file descriptor, file offset of the storage bytes, meta tensor with the item's
        geometry) of one stored item; None if it is not a plain torch.save zip."""
        info = self.metadata.storage_data.get(index)
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        fd = self._fd(info.relative_path)
        try:
            geometry = torch.load(_FileSlice(fd, info.offset, info.length), map_location="meta", weights_only=True)
        except Exception:  # not a torch.save zip (or damaged): dcp.load reads it or names the error
            return None
        if not isinstance(geometry, torch.Tensor) or geometry.device.type != "meta":
            return None
        storage = geometry.untyped_storage()
        begin = getattr(storage, "_checkpoint_offset", None)  # where the storage bytes start in the zip
        if begin is None or begin + storage.nbytes() > info.length:
            return None
        return fd, info.offset + begin, geometry

    def stored(self, index: MetadataIndex) -> torch.Tensor | None:
        """The tensor of one stored item, a view of the file; None if this reader cannot map it."""
        located = self._locate(index)
        if located is None:
            return None
        fd, start, geometry = located
        check = self.checks.get((index.fqn, tuple(index.offset or ())))
        if check is not None:  # the whole item, through the page cache the view then reads from
            verify_mapped(fd, os.path.join(self.directory, self.metadata.storage_data[index].relative_path), check)
        nbytes = geometry.untyped_storage().nbytes()
        if nbytes == 0:
            return torch.empty(geometry.shape, dtype=geometry.dtype)
        flat = _mapped(fd, start, nbytes, geometry.dtype)
        return flat.as_strided(geometry.shape, geometry.stride(), geometry.storage_offset())

    def span(self, fqn: str) -> FileSpan | None:
        """Where the bytes of `fqn` lie, if it is stored whole as one C-order item (a tensor saved
        from one process, or replicated: what DCP writes for it is its contiguous copy); else None."""
        meta = self.metadata.state_dict_metadata[fqn]
        if len(meta.chunks) != 1 or tuple(meta.chunks[0].sizes) != tuple(meta.size):
            return None
        index = MetadataIndex(fqn, meta.chunks[0].offsets)
        located = self._locate(index)
        if located is None:
            return None
        _, start, geometry = located
        whole = geometry.numel() * geometry.element_size() == geometry.untyped_storage().nbytes()
        if (geometry.dtype != meta.properties.dtype or tuple(geometry.shape) != tuple(meta.size)
                or not geometry.is_contiguous() or geometry.storage_offset() or not whole):
            return None
        path = os.path.join(self.directory, self.metadata.storage_data[index].relative_path)
        check = self.checks.get((fqn, tuple(index.offset or ())))
        return FileSpan(path, start, geometry.dtype, tuple(geometry.shape), check=check)

    def tensor(self, fqn: str) -> torch.Tensor | None:
        """The global tensor `fqn`, reassembled from its chunks; None if an item cannot be mapped."""
        meta = self.metadata.state_dict_metadata[fqn]
        size, dtype = tuple(meta.size), meta.properties.dtype
        pieces = []
        for chunk in meta.chunks:
            stored = self.stored(MetadataIndex(fqn, chunk.offsets))
            if stored is None or stored.dtype != dtype or tuple(stored.shape) != tuple(chunk.sizes):
                return None
            pieces.append((chunk, stored))
        if len(pieces) == 1 and tuple(pieces[0][0].sizes) == size:
            return pieces[0][1]  # stored whole: the mapped view itself
        out = torch.empty(size, dtype=dtype)
        covered = 0
        for chunk, stored in pieces:
            region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            out[region].copy_(stored)
            covered += stored.numel()
        if covered != out.numel():
            raise ValueError(f"{self.directory}: the chunks of {fqn} cover {covered} of its {out.numel()} elements")
        return out
