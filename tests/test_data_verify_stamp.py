"""The .idx checksum is verified once per file version, not in every process at every
start (a LAION-2B-sized .idx is ~70 GB): a stamp records the verified file's identity, and
any write to the file, even one that puts its size and mtime back, makes it hashed again."""

import json
import os

import pytest

from megatron_emu.data import checksums, locks
from megatron_emu.data.indexed import MultimodalIndexed
from megatron_emu.data.preprocess import preprocess, synthetic_shards
from megatron_emu.data.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer"))


@pytest.fixture
def prefix(tokenizer_model, tmp_path):
    p = str(tmp_path / "pairs")
    preprocess(synthetic_shards("pairs", 4, 0), p, "pairs", tokenizer_model, image_format="jpeg", progress=False)
    return p


@pytest.fixture
def hashes(monkeypatch):
    """Counts the .idx hashes of a fresh process (the in-process memo is emptied)."""
    monkeypatch.setattr(checksums, "_VERIFIED", set())
    calls = []
    real = checksums.file_xxh3
    monkeypatch.setattr(checksums, "file_xxh3", lambda path, *a: calls.append(path) or real(path, *a))
    return calls


def new_process():
    checksums._VERIFIED.clear()


def test_a_verified_idx_is_not_hashed_again_by_another_process(prefix, hashes):
    MultimodalIndexed(prefix)
    assert hashes == [prefix + ".idx"]
    stamp = json.loads(open(prefix + ".idx-verified.json").read())
    assert stamp["xxh3"] == json.loads(open(prefix + ".json").read())["idx_xxh3"]
    for _ in range(3):  # ranks and DataLoader workers of every node
        new_process()
        MultimodalIndexed(prefix)
    assert hashes == [prefix + ".idx"]


def test_a_byte_flipped_under_a_stamp_is_still_refused(prefix, hashes):
    MultimodalIndexed(prefix)
    st = os.stat(prefix + ".idx")
    with open(prefix + ".idx", "r+b") as f:  # same size; then the mtime is put back too
        f.seek(st.st_size - 9)
        byte = f.read(1)
        f.seek(st.st_size - 9)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(prefix + ".idx", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(prefix + ".idx").st_mtime_ns == st.st_mtime_ns and os.stat(prefix + ".idx").st_size == st.st_size
    new_process()
    with pytest.raises(ValueError, match=r"pairs\.idx: checksum xxh3_64 .* differs"):
        MultimodalIndexed(prefix)
    assert len(hashes) == 2


@pytest.mark.parametrize("damage", ["garbage", "another digest", "missing"])
def test_a_damaged_stamp_is_not_trusted(prefix, hashes, damage):
    MultimodalIndexed(prefix)
    stamp_path = prefix + ".idx-verified.json"
    if damage == "garbage":
        open(stamp_path, "w").write("{not json")
    elif damage == "another digest":
        stamp = json.load(open(stamp_path))
        open(stamp_path, "w").write(json.dumps(dict(stamp, xxh3="0" * 16)))
    else:
        os.remove(stamp_path)
    new_process()
    MultimodalIndexed(prefix)
    assert len(hashes) == 2  # hashed again, and the stamp rewritten
    new_process()
    MultimodalIndexed(prefix)
    assert len(hashes) == 2


def test_stamps_of_a_read_only_dataset_go_to_the_cache(prefix, hashes, tmp_path, monkeypatch):
    dataset_dir = os.path.dirname(prefix)
    real_access = os.access
    monkeypatch.setattr(locks.os, "access", lambda p, mode: False if p == dataset_dir else real_access(p, mode))
    monkeypatch.setenv("MEGATRON_EMU_CACHE", str(tmp_path / "cache"))
    MultimodalIndexed(prefix)
    assert not os.path.exists(prefix + ".idx-verified.json")
    (stamp,) = [f for f in os.listdir(tmp_path / "cache" / "plans") if f.endswith(".idx-verified.json")]
    assert stamp.startswith("pairs-")
    new_process()
    MultimodalIndexed(prefix)
    assert len(hashes) == 1
