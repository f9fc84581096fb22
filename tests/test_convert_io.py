"""Conversion I/O below the formats: the direct DCP reader (equal to dcp.load on a
checkpoint saved sharded), the O_DIRECT writer and the file-span copies (byte-identical
to safetensors.save_file and read by dcp.load), their page-cache fallbacks and bad input.
The format-level conversions and their parity tests are in tests/test_convert.py."""

import os

import pytest
import torch

from megatron_emu.convert.dcp_reader import DirectReader
from megatron_emu.convert.streams import DCPSource, write_shard
from tests.dist_utils import spawn


def _sharded_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"rows": torch.randn(5, 6, generator=g), "cols": torch.randn(4, 7, generator=g),
            "whole": torch.randn(3, 3, generator=g), "half": torch.randn(9, generator=g).half()}


def _save_sharded(rank: int, world: int, directory: str) -> None:
    """Uneven row shards (FSDP-like: 3 + 2 rows), column shards (TP colwise), a replicated
    tensor (stored once) and a bf16 one, saved from two gloo ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    values = _sharded_values()
    placements = {"rows": Shard(0), "cols": Shard(1), "whole": Replicate(), "half": Shard(0)}
    state = {"model": {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in values.items()}}
    dcp.save(state, checkpoint_id=directory)


@pytest.fixture(scope="module")
def sharded_dcp(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("sharded") / "dcp")
    spawn(2, _save_sharded, directory)
    return directory


def _dcp_load(directory: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": state}, checkpoint_id=directory, no_dist=True)
    return state


def test_direct_reader_equals_dcp_load_on_a_checkpoint_saved_sharded(sharded_dcp):
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(sharded_dcp).read_metadata()
    assert len(metadata.state_dict_metadata["model.rows"].chunks) == 2  # really sharded
    assert len(metadata.state_dict_metadata["model.whole"].chunks) == 1
    expected = _dcp_load(sharded_dcp, _sharded_values())
    with DirectReader(sharded_dcp, metadata) as reader:
        got = {k: reader.tensor(f"model.{k}") for k in expected}
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        assert torch.equal(v, _sharded_values()[k]), k  # and both are what was saved
    got["whole"].add_(1)  # a mapped view is copy-on-write: the checkpoint keeps its bytes
    assert torch.equal(_dcp_load(sharded_dcp, _sharded_values())["whole"], expected["whole"])


def test_direct_reader_names_missing_chunks(sharded_dcp):
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(sharded_dcp).read_metadata()
    metadata.state_dict_metadata["model.rows"].chunks.pop()  # as if one rank's part were lost
    with DirectReader(sharded_dcp, metadata) as reader, pytest.raises(ValueError, match="model.rows cover 18 of its 30"):
        reader.tensor("model.rows")


@pytest.mark.parametrize("chunk", [4096, 3 * 4096, 2**20])
def test_shard_writer_is_byte_identical_to_safetensors(tmp_path, monkeypatch, chunk):
    from safetensors.torch import load_file, save_file

    from megatron_emu import direct_io

    monkeypatch.setattr(direct_io, "CHUNK", chunk)  # small staging buffers: many writes, a cut tail
    monkeypatch.setattr(direct_io, "_free_buffers", [])
    g = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(100, 33, generator=g), "wt": torch.randn(20, 50, generator=g).t(),
               "b": torch.randn(7, generator=g).to(torch.bfloat16), "h": torch.randn(5, generator=g).half(),
               "i": torch.arange(9), "m": torch.tensor([True, False, True]), "e": torch.empty(0, 4)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    write_shard(str(tmp_path / "ours.safetensors"), tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_direct_file_falls_back_to_the_page_cache_with_the_same_bytes(tmp_path, monkeypatch):
    import errno

    from megatron_emu import direct_io

    monkeypatch.setattr(direct_io, "CHUNK", 4096)
    monkeypatch.setattr(direct_io, "_free_buffers", [])
    real, refused = os.pwrite, []

    def pwrite(fd, data, offset):  # a device that refuses the first O_DIRECT write
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    payload = torch.arange(5000, dtype=torch.int32)  # 20000 bytes: 4 full buffers and a cut tail
    with direct_io.DirectFile(str(tmp_path / "f")) as out:
        out.write(b"head")
        out.write(payload)
    assert refused and (tmp_path / "f").read_bytes() == b"head" + payload.numpy().tobytes()


def test_grouped_writer_output_is_read_by_dcp_load(tmp_path):
    """Direct-written groups (views, non-contiguous and narrowed tensors, bytes) load with dcp.load."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from megatron_emu.convert.dcp_writer import GroupedDCPWriter

    g = torch.Generator().manual_seed(5)
    big = torch.randn(50, 40, generator=g)
    groups = [{"model": {"a": torch.randn(300, 7, generator=g), "t": big.t(), "rows": big[10:20]}},
              {"model": {"h": torch.randn(11, generator=g).bfloat16(), "e": torch.empty(0, 3), "i": torch.arange(6)}},
              {"common": pickle.dumps({"iteration": 3})}]
    writer = GroupedDCPWriter(str(tmp_path / "ckpt"))
    for group in groups:
        writer.write(group)
    writer.finish()
    want = {k: v for group in groups[:2] for k, v in group["model"].items()}
    state = {"model": {k: torch.zeros_like(v) for k, v in want.items()}, "common": b""}  # as Checkpointer.load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert all(torch.equal(state["model"][k], v) and state["model"][k].dtype == v.dtype for k, v in want.items())
    assert pickle.loads(state["common"]) == {"iteration": 3}


def _span_file(tmp_path, nbytes: int = 50_000):
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "input.bin"
    path.write_bytes(data.numpy().tobytes())
    return str(path), data.numpy().tobytes()


def _drop_cache(path: str) -> None:
    """Drop the file from the page cache, and wait until it is really gone: the kernel may keep
    pages still under writeback after one DONTNEED (a flaky CI run). The check asks for the
    last page with RWF_NOWAIT, which on a miss starts reading that page in: so it is not the
    first page, which read_spans probes first (a probe of it here made a loaded run find the
    file cached)."""
    import time

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # a probe's miss reads one page, no readahead
        last_page = (os.fstat(fd).st_size - 1) // 4096 * 4096
        for _ in range(100):
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not hasattr(os, "RWF_NOWAIT"):
                return
            try:
                os.preadv(fd, [bytearray(4096)], last_page, os.RWF_NOWAIT)  # succeeds only from the cache
            except OSError:  # EAGAIN: not cached (EOPNOTSUPP: the reader cannot tell either)
                return
            time.sleep(0.05)
        raise AssertionError(f"{path}: the kernel kept the file in the page cache after 100 DONTNEED calls")
    finally:
        os.close(fd)


@pytest.mark.parametrize("refuse", [None, "open", "read"])
@pytest.mark.parametrize("cached", [True, False])
def test_read_spans_gives_the_file_bytes_with_and_without_o_direct(tmp_path, monkeypatch, refuse, cached):
    """Unaligned spans across buffer boundaries, from the page cache or the disk, and on a
    filesystem that refuses O_DIRECT when opening or reading (tmpfs before Linux 6.6)."""
    import errno
    import fcntl

    from megatron_emu import direct_io
    from megatron_emu.direct_io import FileSpan, read_spans

    monkeypatch.setattr(direct_io, "CHUNK", 3 * 4096)
    monkeypatch.setattr(direct_io, "_free_buffers", [])
    path, data = _span_file(tmp_path)
    if not cached:
        _drop_cache(path)
    real_open, real_preadv, refused = os.open, os.preadv, []

    def open_(p, flags, *args):
        if refuse == "open" and flags & getattr(os, "O_DIRECT", 0):
            refused.append(p)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    def preadv(fd, buffers, offset, *flags):
        if refuse == "read" and fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(direct_io.os, "open", open_)
    monkeypatch.setattr(direct_io.os, "preadv", preadv)
    spans = [(1, 30_000), (5, 0), (40_001, 9_999), (0, 4096), (12_288, 100)]  # (offset, nbytes)
    got = [bytes(piece) for piece in read_spans(FileSpan(path, o, torch.uint8, (n,)) for o, n in spans)]
    assert b"".join(got) == b"".join(data[o:o + n] for o, n in spans)
    assert all(0 < len(piece) <= 3 * 4096 for piece in got)
    # a cached file is read from the page cache: no O_DIRECT read to refuse
    assert bool(refused) == (refuse == "open" or (refuse == "read" and not cached))


def test_read_spans_names_a_truncated_file(tmp_path):
    from megatron_emu.direct_io import FileSpan

    path, _ = _span_file(tmp_path)
    _drop_cache(path)
    with pytest.raises(ValueError, match="input.bin: truncated"):
        FileSpan(path, 40_000, torch.float32, (5000,)).tensor()  # 20000 bytes from 40000: past the end


def test_spans_are_written_like_the_tensors_they_name(tmp_path, monkeypatch):
    """FileSpans in a safetensors shard and in a DCP group give the bytes of the tensors."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from megatron_emu import direct_io
    from megatron_emu.convert.dcp_writer import GroupedDCPWriter
    from megatron_emu.convert.streams import SafetensorsSource

    monkeypatch.setattr(direct_io, "CHUNK", 4096)
    monkeypatch.setattr(direct_io, "_free_buffers", [])
    g = torch.Generator().manual_seed(4)
    tensors = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g).bfloat16(), "c": torch.arange(1000)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    spans = dict(SafetensorsSource(str(tmp_path / "in.safetensors")).spans())
    assert all(isinstance(s, direct_io.FileSpan) for s in spans.values())
    assert all(torch.equal(spans[k].tensor(), v) for k, v in tensors.items())
    _drop_cache(str(tmp_path / "in.safetensors"))
    write_shard(str(tmp_path / "out.safetensors"), {**spans, "d": torch.ones(3)})
    save_file({**tensors, "d": torch.ones(3)}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    writer = GroupedDCPWriter(str(tmp_path / "ckpt"))
    writer.write({"model": {**spans, "d": torch.ones(3)}})
    writer.finish()
    state = {"model": {k: torch.zeros_like(v) for k, v in {**tensors, "d": torch.ones(3)}.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert all(torch.equal(state["model"][k], v) for k, v in tensors.items())
    back = DCPSource.__new__(DCPSource)  # the export reader finds the items as spans again
    back.path, back.metadata = str(tmp_path / "ckpt"), dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata()
    back.entries = {k[len("model."):]: m for k, m in back.metadata.state_dict_metadata.items()}
    back.checks = {}  # an imported group: no checksums.json
    again = back.read(list(tensors), spans=True)
    assert all(isinstance(s, direct_io.FileSpan) and torch.equal(s.tensor(), tensors[k]) for k, s in again.items())
