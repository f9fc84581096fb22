"""Concurrent first runs: several processes (ranks) start on an empty cache at the same
moment; the tokenizer and the synthetic corpus are built once and all see identical files."""

import hashlib
import multiprocessing as mp
import os

from megatron_emu.data.indexed import MultimodalIndexed, _mcore

SIZES = {"pairs": 6, "interleaved": 2, "video": 2}
NUM_PROCS = 3


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _rank(cache_dir: str, barrier, results) -> None:
    """One 'rank': counts the builds it does itself and hashes what it gets back."""
    import sentencepiece as spm

    from megatron_emu.data import loader
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    builds = {"tokenizer": 0, "corpus": 0}
    train, build = spm.SentencePieceTrainer.train, loader._build_synthetic

    def counted_train(*a, **k):
        builds["tokenizer"] += 1
        return train(*a, **k)

    def counted_build(*a, **k):
        builds["corpus"] += 1
        return build(*a, **k)

    spm.SentencePieceTrainer.train, loader._build_synthetic = counted_train, counted_build
    try:
        barrier.wait()  # all ranks start together
        path = build_tiny_tokenizer(cache_dir)
        files = {"tokenizer": _digest(path)}
        tok = EmuTokenizer(path)
        data_path = loader.ensure_synthetic_corpus(cache_dir, tok, sizes=SIZES)
        for prefix in data_path[1::2]:
            for ext in (".bin", ".idx", ".json"):
                files[os.path.basename(prefix) + ext] = _digest(prefix + ext)
        results.put({"files": files, "builds": builds, "data_path": data_path})
    except BaseException as e:  # reported to the parent rather than lost in a child
        results.put({"error": repr(e)})


def test_ranks_racing_on_an_empty_cache_build_once_and_agree(tmp_path):
    _mcore()  # imported once before forking, not in each child
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(NUM_PROCS), ctx.Queue()
    cache = str(tmp_path / "cache")  # does not exist yet
    procs = [ctx.Process(target=_rank, args=(cache, barrier, results)) for _ in range(NUM_PROCS)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all("error" not in o for o in outs), outs
    assert all(o["files"] == outs[0]["files"] for o in outs)  # identical bytes everywhere
    assert all(o["data_path"] == outs[0]["data_path"] for o in outs)
    assert sum(o["builds"]["tokenizer"] for o in outs) == 1
    assert sum(o["builds"]["corpus"] for o in outs) == len(SIZES)  # each dataset built by one rank
    root = os.path.dirname(outs[0]["data_path"][1])
    assert not [n for n in os.listdir(root) if n.startswith(".building")]  # no temporaries left
    counts = [len(MultimodalIndexed(prefix)) for prefix in outs[0]["data_path"][1::2]]
    assert counts == list(SIZES.values())


def test_incomplete_dataset_in_the_cache_is_rebuilt(tmp_path):
    from megatron_emu.data.loader import ensure_synthetic_corpus
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    tok = EmuTokenizer(build_tiny_tokenizer(str(tmp_path)))
    sizes = {"pairs": 4}
    prefix = ensure_synthetic_corpus(str(tmp_path), tok, sizes=sizes)[1]
    good = _digest(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:  # a build killed mid-write
        f.truncate(1000)
    assert ensure_synthetic_corpus(str(tmp_path), tok, sizes=sizes)[1] == prefix
    assert _digest(prefix + ".bin") == good and len(MultimodalIndexed(prefix, tok.fingerprint)) == 4
