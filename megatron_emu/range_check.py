"""A checksum recorded for a byte range of a file, checked as the range is read.

The exporter reads a DCP item's tensor bytes as a FileSpan (direct_io.py) or
through a mapping (convert/dcp_reader.py); the digest recorded at save time covers the
whole item (the torch.save zip around the tensor, training/checksums.py). A RangeCheck
travels with the span and hashes the item's bytes before and after the span (a few KiB
of zip records, read through the page cache) around the span's own as they pass.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from megatron_emu.direct_io import FileSpan


@dataclasses.dataclass(frozen=True)
class RangeCheck:
    """The xxh3_64 digest recorded for bytes [offset, offset + length) of a span's file, a range
    around the span (the DCP item, a torch.save zip, around its tensor's bytes). read_spans
    hashes the range's bytes before the span, the span's own as they pass, and those after
    it, and refuses a mismatch naming the file and `label` (the tensor): the bytes are checked
    in the same read that copies them."""

    offset: int
    length: int
    digest: str
    label: str

    def begin(self, span: FileSpan):
        hasher = xxhash.xxh3_64()
        hasher.update(_pread(span.path, self.offset, span.offset - self.offset))
        return hasher

    def end(self, hasher, span: FileSpan) -> None:
        after = span.offset + span.nbytes
        hasher.update(_pread(span.path, after, self.offset + self.length - after))
        self.compare(hasher.hexdigest(), span.path)

    def compare(self, digest: str, path: str) -> None:
        if digest != self.digest:
            raise ValueError(f"{path}: checksum mismatch in tensor {self.label} "
                             f"(bytes {self.offset}-{self.offset + self.length}): the checkpoint is corrupted")


def _pread(path: str, offset: int, length: int) -> bytes:
    """A few bytes (an item's zip records) through the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise ValueError(f"{path}: truncated (bytes up to {offset + length} needed, the file ends at {offset + len(data)})")
    return data


def verify_mapped(fd: int, path: str, check: RangeCheck) -> None:
    """Hash the checked range of an open file through a mapping (for items that are mapped,
    not copied: their pages are then in the page cache for the view that reads them)."""
    base = check.offset - check.offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, check.offset + check.length - base, access=mmap.ACCESS_READ, offset=base) as region:
        with memoryview(region) as view:
            digest = xxhash.xxh3_64(view[check.offset - base:]).hexdigest()
    check.compare(digest, path)
