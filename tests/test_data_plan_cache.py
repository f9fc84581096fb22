"""Plan caches (data/plan_cache.py): equal to the reference on the synthetic corpus, reused
while the key holds, rebuilt when it changes or the file is damaged, shared by racing
processes; plus the per-read image check that replaced the O(n) one at open."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_emu.data import plan_cache
from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, DocumentWriter, MultimodalIndexed, read_meta, write_meta
from megatron_emu.data.loader import ensure_synthetic_corpus
from megatron_emu.data.samples import InterleavedView, PairsWindowView, SeqSpec, plan_chunks, plan_pair_windows
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from tests.test_data_plans import padded, reference_chunks, reference_windows


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


@pytest.fixture(scope="module")
def corpus(tok, tmp_path_factory):
    """The bundled corpus' interleaved generator, 40 documents."""
    data_path = ensure_synthetic_corpus(str(tmp_path_factory.mktemp("corpus")), tok, sizes={"interleaved": 40})
    return data_path[1]


@pytest.fixture
def data(corpus, tmp_path):
    """A private copy (tests below damage and touch files)."""
    for ext in (".bin", ".idx", ".json"):
        os.link(corpus + ext, str(tmp_path / "mmc") + ext)
    return MultimodalIndexed(str(tmp_path / "mmc"))


def plan_files(data):
    return sorted(p for p in os.listdir(os.path.dirname(data.prefix)) if ".plan-" in p and not p.endswith(".lock"))


@pytest.mark.parametrize("seq_length", [36, 64, 192, 1024])
def test_cached_plans_equal_the_reference_on_the_synthetic_corpus(tok, data, seq_length):
    spec = SeqSpec.from_tokenizer(tok, seq_length)
    for max_images in (1, 5):
        np.testing.assert_array_equal(plan_chunks(data, spec, max_images),
                                      reference_chunks(data, seq_length, spec.tokens_per_image, max_images))
    np.testing.assert_array_equal(plan_pair_windows(data, 5), padded(reference_windows(data, 5), 5))


def test_plan_is_reused_and_a_changed_key_rebuilds(tok, data, monkeypatch):
    monkeypatch.setattr(plan_cache, "IN_MEMORY_BYTES", 0)  # mapped, as a plan of a real dataset is
    builds = []
    real = plan_cache._build
    monkeypatch.setattr(plan_cache, "_build", lambda *a: builds.append(a[1]) or real(*a))
    spec = SeqSpec.from_tokenizer(tok, 192)
    first = InterleavedView(data, spec).plan.array
    assert isinstance(first, np.memmap) and len(builds) == 1
    InterleavedView(data, spec)
    assert len(builds) == 1  # reused
    InterleavedView(data, SeqSpec.from_tokenizer(tok, 256))  # --seq-length
    InterleavedView(data, spec, max_images=2)
    InterleavedView(data, SeqSpec.from_tokenizer(tok, 192, tokens_per_image=40))
    assert len(builds) == 4 and len(set(builds)) == 4
    InterleavedView(MultimodalIndexed(data.prefix), spec)
    assert len(builds) == 4  # reopened, unchanged: reused
    write_meta(data.prefix, dict(read_meta(data.prefix), tokenizer="another-tokenizer"))  # re-tokenized
    InterleavedView(MultimodalIndexed(data.prefix), spec)
    os.utime(data.prefix + ".idx", ns=(1, 1))  # the .idx replaced
    np.testing.assert_array_equal(InterleavedView(MultimodalIndexed(data.prefix), spec).plan.array, first)
    assert len(builds) == 6
    # A dataset opened before the change keeps the plan of the files it mapped.
    InterleavedView(data, spec)
    assert len(builds) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "garbage header", "header only"])
def test_damaged_plan_is_rebuilt_not_trusted(tok, data, damage):
    spec = SeqSpec.from_tokenizer(tok, 64)
    good = np.array(InterleavedView(data, spec).plan.array)
    (name,) = [p for p in plan_files(data) if p.endswith(".bin")]
    path = os.path.join(os.path.dirname(data.prefix), name)
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 8)
    elif damage == "flip a byte":
        with open(path, "r+b") as f:
            f.seek(plan_cache.HEADER_BYTES + 8 * 5)
            f.write(b"\x7f")
    elif damage == "garbage header":
        with open(path, "r+b") as f:
            f.write(b"{not json")
    else:
        os.truncate(path, plan_cache.HEADER_BYTES)
    with pytest.warns(UserWarning, match=r"\.plan-chunks-.*\.bin: .*rebuilding the plan"):
        again = InterleavedView(data, spec).plan.array
    np.testing.assert_array_equal(again, good)
    assert not any(".tmp" in p for p in plan_files(data))


def test_read_only_dataset_puts_its_plan_in_the_cache_dir(tok, data, tmp_path, monkeypatch):
    dataset_dir = os.path.dirname(data.prefix)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == dataset_dir else real_access(p, mode))
    monkeypatch.setattr(plan_cache, "IN_MEMORY_BYTES", 0)
    view = PairsWindowView(data, SeqSpec.from_tokenizer(tok, 512), cache_dir=str(tmp_path / "cache"))
    assert plan_files(data) == []
    assert os.path.dirname(view.plan.array.filename).startswith(str(tmp_path / "cache" / "plans"))


RACER = """
import sys, numpy as np
from megatron_emu.data import plan_cache  # numpy only: starts fast even on a busy machine
real = plan_cache._build
def counted(*a):
    open(sys.argv[2], "a").write("built\\n")
    return real(*a)
plan_cache._build = counted
per_document = lambda lengths, modes, doc_index: np.stack([doc_index[:-1], np.diff(doc_index)], axis=1)
print(np.asarray(plan_cache.cached_plan(sys.argv[1], "items", {}, 2, per_document, docs_per_block=7)).tolist())
"""


def test_racing_processes_build_once_and_agree(data, tmp_path):
    log = str(tmp_path / "builds.log")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, "-c", RACER, data.prefix, log], stdout=subprocess.PIPE, env=env,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    assert json.loads(outs[0]) == [[int(d[0]), int(d[1] - d[0])] for d in zip(data.doc_index[:-1], data.doc_index[1:])]
    assert open(log).read() == "built\n"


def test_a_wrong_sized_image_is_refused_when_read_naming_dataset_and_item(tok, tmp_path):
    prefix = str(tmp_path / "bad")
    w = DocumentWriter(prefix, tok.vocab_size)
    w.add_document([(MODE_TEXT, np.arange(3)), (MODE_IMAGE, np.zeros((3, 224, 224), np.uint8))])
    w.finalize({"kind": "interleaved", "image_size": 224, "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size})
    meta = json.load(open(prefix + ".json"))
    write_meta(prefix, dict(meta, image_size=112))  # the description disagrees with the stored images
    data = MultimodalIndexed(prefix)
    with pytest.raises(ValueError, match=r"bad: document 0, sequence 1: not a 112x112 uint8 image"):
        data.read_item(1)


def test_views_pickle_their_plan_as_a_file_name_for_spawned_workers(tok, data, monkeypatch):
    monkeypatch.setattr(plan_cache, "IN_MEMORY_BYTES", plan_cache.IN_MEMORY_BYTES)  # restored after
    import pickle

    view = InterleavedView(data, SeqSpec.from_tokenizer(tok, 40))  # many chunks
    assert isinstance(view.plan.array, np.ndarray)  # small: read whole, pickles by value
    plan_cache.IN_MEMORY_BYTES = 0
    view = InterleavedView(data, SeqSpec.from_tokenizer(tok, 40))
    blob = pickle.dumps(view.plan)
    assert len(blob) < 1024 < view.plan.array.nbytes
    again = pickle.loads(blob).array
    assert isinstance(again, np.memmap) and again.filename == view.plan.array.filename
    np.testing.assert_array_equal(again, view.plan.array)


def test_a_damaged_plan_beside_a_read_only_dataset_is_rebuilt_in_the_cache_dir(tok, data, tmp_path, monkeypatch):
    """The plan beside the dataset is read first; when it cannot be used and the dataset's
    directory is read-only, the rebuild goes to the cache dir (not beside it), and the
    damaged file is left as it was."""
    spec = SeqSpec.from_tokenizer(tok, 64)
    good = np.array(InterleavedView(data, spec).plan.array)  # built beside, while writable
    (name,) = [p for p in plan_files(data) if p.endswith(".bin")]
    beside = os.path.join(os.path.dirname(data.prefix), name)
    os.truncate(beside, os.path.getsize(beside) - 8)
    damaged = open(beside, "rb").read()
    dataset_dir = os.path.dirname(data.prefix)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == dataset_dir else real_access(p, mode))
    view = InterleavedView(data, spec, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(view.plan.array, good)
    assert open(beside, "rb").read() == damaged
    assert any(".plan-chunks-" in p for p in os.listdir(tmp_path / "cache" / "plans"))


def test_a_full_disk_while_a_plan_is_written_names_the_plan_and_leaves_no_part(tok, data, monkeypatch):
    """ENOSPC while the plan is synced: one message naming the plan file and what to do (the
    run prints it as its one error line), no temporary file left, and once there is room the
    same call builds the plan."""
    import errno

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plan_cache.os, "fsync", full)
    spec = SeqSpec.from_tokenizer(tok, 192)
    with pytest.raises(OSError, match=r"\.plan-[^:]*: no space left to write the sample plan \([\d,]+ rows so far, "
                                      r"32 bytes each\); free space there, or give --data-cache-dir") as caught:
        plan_chunks(data, spec, 5)
    assert caught.value.errno == errno.ENOSPC and data.prefix in str(caught.value)
    assert plan_files(data) == []  # no .tmp left
    monkeypatch.setattr(plan_cache.os, "fsync", real_fsync)
    np.testing.assert_array_equal(plan_chunks(data, spec, 5), reference_chunks(data, 192, spec.tokens_per_image, 5))


def test_a_killed_builders_temporary_plan_is_removed_by_the_next_build(tok, data):
    """A builder killed mid-write leaves `<plan>.tmp<pid>` (gigabytes at 75M documents); the
    next build, holding the plan's lock, removes it before writing its own."""
    spec = SeqSpec.from_tokenizer(tok, 192)
    plan_chunks(data, spec, 5)
    (plan,) = [p for p in plan_files(data) if ".tmp" not in p]
    path = os.path.join(os.path.dirname(data.prefix), plan)
    os.rename(path, path + ".tmp424242")  # as if killed before its rename
    reopened = MultimodalIndexed(data.prefix)
    np.testing.assert_array_equal(plan_chunks(reopened, spec, 5), reference_chunks(data, 192, spec.tokens_per_image, 5))
    assert plan_files(data) == [plan]
