"""Write one DCP checkpoint group by group, so an import never holds the whole model.

`dcp.save` needs every tensor of a checkpoint in one state dict (its file writer even
keeps each file's tensors referenced until the file is closed). Here each group (about
one --max-shard-size of tensors) is saved by its own `dcp.save` into a scratch folder;
`finish` moves every group's data file into the checkpoint directory under a distinct
name and writes one `.metadata` that indexes them all. The result is an ordinary DCP
checkpoint: `dcp.load`, our Checkpointer and DCPSource read it like any other.

Each group's data file is written by DirectDCPWriter, a dcp.FileSystemWriter whose
items keep DCP's layout (one torch.save zip per tensor, at the offset the metadata
records) but whose bytes go out through DirectFile (O_DIRECT, direct_io.py):
torch.save writes each zip with `torch.serialization.skip_data()` (its records and
pickled tensor geometry, a hole where the storage bytes go) and the hole is filled from
the tensor's own memory. The bytes are hashed as they are written, and `finish` records
the digests in checksums.json as the Checkpointer does (training/checksums.py).
Compared with dcp.save's torch.save into a buffered file, the
bytes are copied once (into a staging buffer), not zip-CRC'd (torch.load does not
check zip CRCs; `torch.utils.serialization.config.save.compute_crc32 = False` writes
the same kind of file), and take no page-cache pages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megatron_emu.direct_io import DirectFile, FileSpan, read_spans
from megatron_emu.training.checksums import ALGORITHM, item_entry, write_record


class _ZipSink(io.RawIOBase):
    """The stream torch.save writes one tensor's zip to under skip_data: records go to
    `out`; the seek over the storage bytes is where `fill()` writes the tensor's bytes."""

    def __init__(self, out: DirectFile, nbytes: int, fill):
        super().__init__()
        self.out, self.nbytes, self.fill = out, nbytes, fill
        self.start, self.filled = out.tell(), False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.out.tell() - self.start

    def write(self, data) -> int:
        self.out.write(data)
        return memoryview(data).nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.tell() + offset if whence == io.SEEK_CUR else None
        if target == self.tell():
            return target
        if not self.filled and target == self.tell() + self.nbytes:  # the hole skip_data leaves for the storage
            self.fill()
            self.filled = True
            return self.tell()
        raise io.UnsupportedOperation(f"torch.save seeked to {target} (at {self.tell()}): an unknown zip layout")


def save_tensor_item(out: DirectFile, tensor: torch.Tensor, fill=None) -> None:
    """Append what torch.save(tensor) writes, but with the data straight from the tensor
    (or written by `fill()`, for a placeholder whose bytes come from a FileSpan)."""
    tensor = tensor.detach()
    storage = tensor.untyped_storage()
    if not tensor.is_contiguous() or tensor.storage_offset() or storage.nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # as DCP does: save only the tensor's bytes
    sink = _ZipSink(out, tensor.untyped_storage().nbytes(), fill or (lambda: out.write(tensor)))
    with torch.serialization.skip_data():
        torch.save(tensor, sink)
    if tensor.numel() and not sink.filled:
        raise RuntimeError("torch.save under skip_data left no hole for the tensor's bytes: an unknown zip layout")


class DirectDCPWriter(dcp.FileSystemWriter):
    """dcp.FileSystemWriter (one file, no process group) whose data goes out through DirectFile.

    `spans` (fqn -> FileSpan) gives the bytes of items whose state-dict value is only a
    placeholder of the right geometry (an untouched torch.empty): they are copied from
    the span's file with O_DIRECT, read ahead across items (direct_io.py).
    """

    def __init__(self, path: str, spans: dict[str, FileSpan] | None = None):
        super().__init__(path)
        self.spans = spans or {}
        self.checksums: dict[str, dict] = {}  # file name -> its checksum entry (training/checksums.py)

    def write_data(self, plan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"  # FileSystemWriter's name for it
        results = []
        spans = [self.spans[item.index.fqn] for item in plan.items if item.index.fqn in self.spans]
        pieces = read_spans(spans)
        items = []
        with DirectFile(os.path.join(self.path, name), checksums=True) as out, contextlib.closing(pieces):
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = out.tell()
                if item.type == WriteItemType.BYTE_IO:
                    out.write(data.getbuffer())
                elif item.index.fqn in self.spans:
                    span = self.spans[item.index.fqn]
                    save_tensor_item(out, data, fill=lambda: out.write_pieces(pieces, span.nbytes))
                else:
                    save_tensor_item(out, data)
                length = out.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
                items.append(item_entry(item.index, offset, length, out.segment_digest()))
        self.checksums[name] = {"size": out.tell(), ALGORITHM: out.file_digest(), "items": items}
        future: Future = Future()
        future.set_result(results)
        return future


def _placeholders(state: dict) -> tuple[dict, dict[str, FileSpan]]:
    """The state with each FileSpan (one level down, as {"model": {name: value}}) replaced by
    torch.empty of its geometry, which dcp.save plans from and nobody touches (large
    allocations cost no memory until written), and {fqn: span} for DirectDCPWriter."""
    planned, spans = {}, {}
    for key, values in state.items():
        if isinstance(values, dict):
            spans.update({f"{key}.{n}": v for n, v in values.items() if isinstance(v, FileSpan)})
            values = {n: torch.empty(v.shape, dtype=v.dtype) if isinstance(v, FileSpan) else v for n, v in values.items()}
        planned[key] = values
    return planned, spans


class GroupedDCPWriter:
    def __init__(self, directory: str):
        self.directory = directory
        self.groups: list[str] = []
        os.makedirs(directory, exist_ok=True)

    def write(self, state: dict) -> None:
        """Save one group now (nested dicts as for dcp.save); its tensors can be freed after.
        A FileSpan value (a tensor copied unchanged from an input file) is read from its file."""
        scratch = os.path.join(self.directory, f".group{len(self.groups)}")
        state, spans = _placeholders(state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            writer = DirectDCPWriter(scratch, spans)
            dcp.save(state, storage_writer=writer, no_dist=True)
        self.groups.append((scratch, writer.checksums))

    def finish(self) -> None:
        """One .metadata over every group's data file; the scratch folders are removed."""
        merged = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
        checksums = {}
        for i, (scratch, group_checksums) in enumerate(self.groups):
            metadata = dcp.FileSystemReader(scratch).read_metadata()
            renamed = {}
            for name in sorted(os.listdir(scratch)):
                if name.endswith(".distcp"):
                    renamed[name] = f"__0_{i}_{len(renamed)}.distcp"
                    os.rename(os.path.join(scratch, name), os.path.join(self.directory, renamed[name]))
                    checksums[renamed[name]] = group_checksums[name]
            repeated = merged.state_dict_metadata.keys() & metadata.state_dict_metadata.keys()
            if repeated:
                raise ValueError(f"{self.directory}: {sorted(repeated)[0]} was written twice (given by two inputs?)")
            merged.state_dict_metadata.update(metadata.state_dict_metadata)
            merged.planner_data.update(metadata.planner_data or {})
            merged.storage_data.update({index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
                                        for index, info in metadata.storage_data.items()})
            merged.version = metadata.version
            shutil.rmtree(scratch)
        tmp = os.path.join(self.directory, ".metadata.tmp")
        data = pickle.dumps(merged)  # what FileSystemWriter.finish writes
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.directory, ".metadata"))
        checksums[".metadata"] = {"size": len(data), ALGORITHM: xxhash.xxh3_64(data).hexdigest()}
        write_record(self.directory, checksums)  # + files written before finish (run_config.json)
