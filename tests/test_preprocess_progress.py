"""Preprocess progress: the bar advances per document (items/s), also from worker processes."""

import pytest

from megatron_emu.data import preprocess as pre
from megatron_emu.data import preprocess_progress as progress
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


class Recorder:
    """Stands in for the tqdm bar; records what the driver tells it."""

    def __init__(self):
        self.events = []

    def documents(self, n):
        self.events.append(n)

    def shard_done(self):
        self.events.append("shard")

    def close(self):
        self.events.append("closed")


def test_worker_counts_reach_the_bar_per_few_documents(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_DOCS", 4)
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 1e9)  # count-driven only: deterministic
    bar = Recorder()
    monkeypatch.setattr(pre, "_progress_bar", lambda *args: bar)
    shards = pre.synthetic_shards("pairs", 30, seed=0, docs_per_shard=10)
    report = pre.preprocess(shards, str(tmp_path / "p"), "pairs", tok.model_path, workers=2)
    counts = [e for e in bar.events if isinstance(e, int)]
    assert sum(counts) == report["documents_in"] == 30
    # 10 documents per shard, reported every 4: 4, 4, 2 per shard, never a whole shard at once
    assert sorted(counts) == sorted([4, 4, 2] * 3)
    assert bar.events.count("shard") == 3 and bar.events[-1] == "closed"


def test_tqdm_bar_shows_documents_rate_and_shards(tok, tmp_path, capsys):
    shards = pre.synthetic_shards("pairs", 12, seed=0, docs_per_shard=5)
    pre.preprocess(shards, str(tmp_path / "q"), "pairs", tok.model_path, workers=1, progress=True)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "12/12" in final and "doc/s" in final and "shards 3/3" in final, final


def test_resumed_shards_start_the_bar_at_their_documents():
    shards = pre.synthetic_shards("pairs", 8, seed=0, docs_per_shard=4)
    bar = pre._progress_bar(True, shards, {0: {"documents_in": 4}}, "resumed")
    try:
        assert (bar.tqdm.n, bar.tqdm.total, bar.shards) == (4, 8, 1)
    finally:
        bar.close()
    files = [pre.Shard(0, "pairs", "a.jsonl", "a.jsonl")]
    bar = pre._progress_bar(True, files, {}, "files")
    try:
        assert bar.tqdm.total is None  # unknown document count: the bar shows count and rate
    finally:
        bar.close()
