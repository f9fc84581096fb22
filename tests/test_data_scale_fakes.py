"""The scale benchmark's fake datasets (tools/data_scale.py) are real megatron-core datasets."""

import os

import numpy as np
import pytest

from megatron_emu.config import DataConfig
from megatron_emu.data.idx_file import write_idx
from megatron_emu.data.indexed import MultimodalIndexed
from megatron_emu.data.loader import build_pretrain_loader
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer
from tools.data_scale import INTERLEAVED, _items, make_fake


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


@pytest.mark.parametrize("kind", ["pairs", "interleaved"])
def test_fake_index_is_what_megatron_core_would_write_and_loads(tok, tmp_path, monkeypatch, kind):
    import tools.data_scale

    monkeypatch.setattr(tools.data_scale, "BLOCK", 24)  # several generation blocks
    prefix = str(tmp_path / kind)
    make_fake(prefix, kind, 100, tok)
    per_doc = 2 if kind == "pairs" else len(INTERLEAVED)
    lengths, modes = _items(kind, 0, 100 * per_doc)
    write_idx(str(tmp_path / "ref.idx"), lengths, modes, np.arange(101) * per_doc, np.uint16)
    assert (tmp_path / "ref.idx").read_bytes() == open(prefix + ".idx", "rb").read()
    data = MultimodalIndexed(prefix, tok.fingerprint, tok.vocab_size)  # megatron-core's IndexedDataset
    assert len(data) == 100 and os.path.getsize(prefix + ".bin") > 0
    assert [m for m, _ in data.read_document(3)] == modes[3 * per_doc:4 * per_doc].tolist()
    path = prefix if kind == "pairs" else prefix + ":pairs"
    cfg = DataConfig(data_path=[path], seq_length=256, micro_batch_size=2, global_batch_size=2, num_workers=0)
    batch = next(build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=0))
    assert batch["tokens"].shape == (2, 256) and batch["images"].shape[1:] == (3, 32, 32)
