"""A dcp.FileSystemWriter that hashes every byte as it writes it, and records the digests.

DCP writes each file through its FileSystem's `create_stream`; ours hands out a stream
that feeds every write to xxh3_64 on the way to the file: once for the whole file, and
once per segment between two `tell()` calls. DCP asks `tell()` right before and right
after each item (filesystem._write_item: the item's offset and length), so each segment
is one item, and its digest lets a verifier name the tensor that differs. (Should a
torch release stop asking, items simply go without their own digest: the file's digest
still covers every byte.)

The digests travel to the coordinator (rank 0) with DCP's own write results: each
result's storage info is, until `finish`, a subclass that carries them; `finish` puts the
plain `_StorageInfo` back (the .metadata stays an ordinary DCP one) and writes
checksums.json next to .metadata, before the Checkpointer renames the directory into place.
Files in the directory that DCP did not write (run_config.json, written by the
Checkpointer before the save) are small: they are hashed at `finish` from the page cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.futures import Future

from megatron_emu.training.checksums import ALGORITHM, item_entry, new_hasher, write_record


class _HashingStream:
    """A file opened for writing, whose bytes are hashed as they pass."""

    def __init__(self, raw):
        self.raw = raw
        self.position = 0
        self.file_hash = new_hasher()
        self.segment_hash, self.segment_start = new_hasher(), 0
        self.segments: dict[int, tuple[int, str]] = {}  # offset -> (length, digest)

    def write(self, data) -> int:
        written = self.raw.write(data)  # a buffered file writes everything it is given
        self.file_hash.update(data)
        self.segment_hash.update(data)
        self.position += memoryview(data).nbytes
        return written

    def tell(self) -> int:
        if self.position > self.segment_start:
            self.segments[self.segment_start] = (self.position - self.segment_start, self.segment_hash.hexdigest())
            self.segment_hash, self.segment_start = new_hasher(), self.position
        return self.position

    def record(self) -> dict:
        return {"size": self.position, ALGORITHM: self.file_hash.hexdigest()}

    def __getattr__(self, name):  # fileno, flush, close, ...: the file's own
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    """DCP's local FileSystem whose written files report their digests into `streams`."""

    def __init__(self, streams: dict[str, _HashingStream]):
        super().__init__()
        self.streams = streams

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
        self.streams[os.path.basename(path)] = stream  # one writer thread per file: no lock needed


@dataclasses.dataclass
class _HashedStorageInfo(_StorageInfo):
    """DCP's storage info plus the digests, from write_data to finish only."""

    item_digest: str | None = None
    file_record: dict | None = None


class ChecksummingWriter(dcp.FileSystemWriter):
    """dcp.FileSystemWriter that writes checksums.json with the checkpoint (same arguments)."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.streams: dict[str, _HashingStream] = {}
        self.fs = _HashingFileSystem(self.streams)

    def write_data(self, plan, planner) -> Future:
        results = super().write_data(plan, planner).wait()  # FileSystemWriter writes before it returns
        future: Future = Future()
        future.set_result([dataclasses.replace(r, storage_data=self._hashed(r.storage_data)) for r in results])
        return future

    def _hashed(self, info: _StorageInfo) -> _HashedStorageInfo:
        stream = self.streams[info.relative_path]
        length, digest = stream.segments.get(info.offset, (None, None))
        return _HashedStorageInfo(info.relative_path, info.offset, info.length, info.transform_descriptors,
                                  item_digest=digest if length == info.length else None, file_record=stream.record())

    def finish(self, metadata, results) -> None:
        files: dict[str, dict] = {}
        plain = [[dataclasses.replace(r, storage_data=self._record(files, r)) for r in rank_results] for rank_results in results]
        super().finish(metadata, plain)
        for name, stream in self.streams.items():
            if name.endswith(".metadata.tmp"):  # written under a temporary name, then renamed
                files[name[: -len(".tmp")]] = stream.record()
        write_record(self.path, files)

    @staticmethod
    def _record(files: dict[str, dict], result) -> _StorageInfo:
        """Note the item's digests in `files`; DCP's plain storage info back."""
        info = result.storage_data
        if not isinstance(info, _HashedStorageInfo):
            return info
        entry = files.setdefault(info.relative_path, {**info.file_record, "items": []})
        if info.item_digest is not None:
            entry["items"].append(item_entry(result.index, info.offset, info.length, info.item_digest))
        return _StorageInfo(info.relative_path, info.offset, info.length, info.transform_descriptors)
