"""Streaming tensor sources and sinks: one tensor (or one shard) in memory at a time.

Sources yield (name, tensor) lazily from a DCP checkpoint (any TP/PP/DP layout: each
global tensor is mapped from, or reassembled out of, the .distcp files by
convert/dcp_reader.py), a safetensors file or sharded directory, or a torch file (all
memory-mapped). Tensors that a conversion copies unchanged can come as FileSpans instead
(where their bytes lie; DCPSource.read(spans=True), SafetensorsSource.spans), read with
O_DIRECT as they are written. The sink writes safetensors shards of a bounded size with
the transformers index, through O_DIRECT (direct_io.py). Outputs are built in a
temporary sibling directory and renamed at the end, so a failed conversion leaves
nothing in the output directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.metadata import MetadataIndex
from tqdm import tqdm

from megatron_emu.convert.dcp_reader import DirectReader
from megatron_emu.direct_io import DirectFile, FileSpan, read_spans

log = logging.getLogger("megatron_emu")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@contextlib.contextmanager
def atomic_output_dir(path: str):
    """Yield a temp directory that becomes `path` only if the block succeeds. Partial
    directories that killed writers of the same output left behind are removed first."""
    if os.path.exists(path) and os.listdir(path):
        raise ValueError(f"{path}: output directory exists and is not empty")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(path))}.partial-"
    sweep_dead_partials(parent, prefix)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rmdir(path)  # empty, checked above
    os.rename(tmp, path)


def sweep_dead_partials(parent: str, prefix: str) -> None:
    """Remove `<prefix><pid>` directories whose process is gone (a SIGKILL, an OOM kill, a
    preempted node: no cleanup ran); a 14B export's leftover would keep its ~28 GB."""
    for name in os.listdir(parent):
        pid = name[len(prefix):]
        if not (name.startswith(prefix) and pid.isdigit()) or pid_alive(int(pid)):
            continue
        log.info("%s: removing the partial output of a writer that is gone (pid %s)", os.path.join(parent, name), pid)
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------
class DCPSource:
    """Model tensors of one of our checkpoints (root with `latest`, or an iteration dir)."""

    def __init__(self, path: str):
        from megatron_emu.training.checkpoint_files import check_shards, iteration_dir, read_latest, read_run_config
        from megatron_emu.training.checksums import item_checks, read_checksums, verify_file, warn_unverified

        if not os.path.exists(os.path.join(path, ".metadata")):
            latest = read_latest(path) if os.path.isdir(path) else None
            if latest is None:
                raise ValueError(f"{path}: not a megatron_emu checkpoint (no .metadata, no latest_checkpointed_iteration.txt)")
            path = iteration_dir(path, latest)
        self.path = path
        # The small files are verified whole before they are read; each model item as its
        # bytes stream through (DirectReader, read_spans): the export reads them once.
        checksums = read_checksums(path)
        if checksums is None:
            warn_unverified(path)
        for name, entry in (checksums or {"files": {}})["files"].items():
            if not name.endswith(".distcp"):
                verify_file(path, name, entry)
        self.checks = item_checks(checksums, "model.") if checksums else {}
        self.record = read_run_config(path)
        self.metadata = dcp.FileSystemReader(path).read_metadata()
        check_shards(path, self.metadata)
        self.entries = {
            key[len("model."):]: meta
            for key, meta in self.metadata.state_dict_metadata.items()
            if key.startswith("model.") and hasattr(meta, "size")
        }

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name].size)

    def nbytes(self, name: str) -> int:
        meta = self.entries[name]
        return torch.Size(meta.size).numel() * meta.properties.dtype.itemsize

    def read(self, names: list[str], direct: bool = True, spans: bool = False) -> dict[str, torch.Tensor | FileSpan]:
        """A group of tensors (one output shard's worth).

        Mapped straight from the .distcp files (convert/dcp_reader.py): a tensor stored
        whole is a copy-on-write view of the file, a sharded one is assembled with one
        copy per chunk. With spans=True a tensor stored whole comes back as a FileSpan
        (where its bytes lie; nothing is read yet) for callers that copy it unchanged.
        Items the direct reader cannot map (and everything, with direct=False) go
        through dcp.load, which reads the same values.
        """
        state = {}
        if direct:
            with DirectReader(self.path, self.metadata, self.checks) as reader:
                reader.prefetch([f"model.{n}" for n in names])
                for n in names:
                    tensor = reader.span(f"model.{n}") if spans else None
                    if tensor is None:
                        tensor = reader.tensor(f"model.{n}")
                    if tensor is not None:
                        state[n] = tensor
        rest = {n: torch.empty(tuple(self.entries[n].size), dtype=self.entries[n].properties.dtype)
                for n in names if n not in state}
        if rest:
            self._verify_items(list(rest))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                dcp.load({"model": rest}, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return {n: state[n] if n in state else rest[n] for n in names}

    def _verify_items(self, names: list[str]) -> None:
        """Check the items dcp.load is about to read (it reads them whole, so do we)."""
        from megatron_emu.training.checksums import hash_range

        for name in names:
            for chunk in self.entries[name].chunks:
                check = self.checks.get((f"model.{name}", tuple(chunk.offsets)))
                if check is not None:
                    index = MetadataIndex(f"model.{name}", chunk.offsets)
                    path = os.path.join(self.path, self.metadata.storage_data[index].relative_path)
                    check.compare(hash_range(path, check.offset, check.length), path)


def _safetensors_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            weight_map = json.load(open(index))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: unreadable index ({e})") from None
        return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


class SafetensorsSource:
    """Tensors of a safetensors file or a transformers directory; headers checked up front."""

    def __init__(self, path: str):
        self.files = _safetensors_files(path)
        self.names: dict[str, str] = {}
        for file in self.files:
            if not os.path.exists(file):
                raise ValueError(f"{file}: listed in the index but missing")
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        self.names[name] = file
                check_length(file)
            except ValueError:
                raise
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def spans(self) -> Iterator[tuple[str, torch.Tensor | FileSpan]]:
        """As iteration, but each tensor as the FileSpan of its bytes (nothing read yet), for
        callers that copy tensors unchanged; a dtype torch cannot name here comes as a tensor."""
        for file in self.files:
            spans = header_spans(file)
            with safe_open(file, framework="pt") as f:
                names = list(f.keys())  # the order iteration yields
            for name in names:
                yield name, spans[name] or self.get(name)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.names[name], framework="pt") as f:
            return f.get_tensor(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers (nothing read)."""
        return {n: tuple(e["shape"]) for file in self.files for n, e in _header(file)[1].items() if n != "__metadata__"}


def _header(file: str) -> tuple[int, dict]:
    """(file offset of the data, the JSON header) of a safetensors file."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"{file}: header length {header_len} runs past the end of the file")
        return 8 + header_len, json.loads(f.read(header_len))


def header_spans(file: str) -> dict[str, FileSpan | None]:
    """Where each tensor's bytes lie in a safetensors file, from its header alone (no mmap of
    the file); None for a dtype torch cannot name here."""
    by_code = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
    start, header = _header(file)
    return {name: FileSpan(file, start + e["data_offsets"][0], by_code[e["dtype"]], tuple(e["shape"]))
            if e["dtype"] in by_code else None for name, e in header.items() if name != "__metadata__"}


def check_length(file: str) -> None:
    """safetensors reads the header lazily; a truncated body must fail before we write."""
    start, header = _header(file)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(file)
    if size < start + end:
        raise ValueError(f"{file}: truncated ({size} bytes, the header promises {start + end})")


class TorchFileSource:
    """A torch.save'd state dict (EVA-CLIP / Emu v1 releases), memory-mapped, not copied."""

    def __init__(self, path: str):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
        for key in ("module", "model", "state_dict"):  # common wrappers
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path}: expected a state dict of tensors")
        self.state = state

    def __iter__(self):
        yield from self.state.items()

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.state.items()}  # memory-mapped: nothing read


def open_source(path: str):
    """Safetensors (file or directory) or a torch file, by what is there."""
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return SafetensorsSource(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    return TorchFileSource(path)


# ---------------------------------------------------------------------------
# Sink: sharded safetensors + index (transformers layout)
# ---------------------------------------------------------------------------
def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group names, in order, into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


# In safetensors' own order (its Rust Dtype enum): the data is laid out from the last to the first.
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(_SAFETENSORS_DTYPES)}


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header safetensors' own writer puts before the data, and the order of the data.

    The format (github.com/huggingface/safetensors, README "Format"): 8 bytes little-endian
    header length N, N bytes of JSON ({"__metadata__": {...}, name: {"dtype", "shape",
    "data_offsets": [begin, end]}}, padded with spaces to a multiple of 8), then the bytes
    of every tensor back to back, C order. Like safetensors, larger dtypes first, then by
    name (safetensors' order, so the file is byte-identical to its save_file's), and every
    tensor starts aligned to its element size.
    """
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _SAFETENSORS_DTYPES})
    if unknown:
        raise ValueError(f"cannot write dtype {unknown[0]} to safetensors")
    order = sorted(tensors, key=lambda k: (-_DTYPE_RANK[tensors[k].dtype], k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_shard(path: str, tensors: dict[str, torch.Tensor | FileSpan]) -> None:
    """One safetensors file, written with O_DIRECT (direct_io.py).

    Tensors go memory -> staging buffer -> disk; FileSpans (DCP items copied unchanged)
    are read with O_DIRECT, the next piece read ahead while the current is written.
    """
    header, order = safetensors_header(tensors, {"format": "pt"})
    spans = read_spans(t for t in (tensors[n] for n in order) if isinstance(t, FileSpan))
    with DirectFile(path) as out, contextlib.closing(spans):
        out.write(header)
        for name in order:
            tensor = tensors[name]
            if isinstance(tensor, FileSpan):
                out.write_pieces(spans, tensor.nbytes)
            else:
                out.write(tensor)


def write_sharded(directory: str, shards: list[dict[str, torch.Tensor]] | Iterator, num_shards: int,
                  total_bytes: int, prefix: str = "model") -> dict:
    """Write `num_shards` shard dicts as prefix-0000i-of-0000n.safetensors plus the index.

    Shard i is written by a background thread while shard i+1 is being produced (mapped
    from DCP, its readahead started, cast if asked), so reading and writing overlap; at
    most two shards are in memory.
    """
    weight_map, written = {}, 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="write", leave=False) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:  # the bar is cleared before an error is printed
        pending = None
        for i, shard in enumerate(shards, start=1):
            name = f"{prefix}.safetensors" if num_shards == 1 else f"{prefix}-{i:05d}-of-{num_shards:05d}.safetensors"
            if pending is not None:
                pending.result()  # raises the writer's error here; frees the previous shard
            pending = pool.submit(write_shard, os.path.join(directory, name), shard)
            size = sum(v.numel() * v.element_size() for v in shard.values())
            written += size
            bar.update(size)
            weight_map.update({k: name for k in shard})
            del shard
        if pending is not None:
            pending.result()
    index = {"metadata": {"total_size": written}, "weight_map": weight_map}
    with open(os.path.join(directory, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index
