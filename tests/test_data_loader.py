"""The training loop's loader: contract shapes, DP slicing, exact shares, exact resume."""

import dataclasses

import pytest
import torch

from megatron_emu.config import DataConfig
from megatron_emu.data.blend import batch_shares
from megatron_emu.data.loader import build_pretrain_loader, ensure_synthetic_corpus
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

SIZES = {"pairs": 40, "interleaved": 8, "video": 6}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


@pytest.fixture(scope="module")
def data_path(tok, tmp_path_factory):
    return ensure_synthetic_corpus(str(tmp_path_factory.mktemp("corpus")), tok, sizes=SIZES)


def config(data_path, **kw):
    base = dict(data_path=data_path, seq_length=192, micro_batch_size=2, global_batch_size=8, num_workers=0)
    return DataConfig(**{**base, **kw})


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_contract_shapes_and_layout(tok, data_path):
    loader = build_pretrain_loader(config(data_path), tok, dp_rank=0, dp_size=1, seed=3)
    s = tok.special
    for batch in take(loader, 8):
        tokens, images = batch["tokens"], batch["images"]
        assert tokens.dtype == torch.long and tokens.shape == (2, 192)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 224, 224)
        assert (tokens == s.image).sum() == 32 * images.shape[0]
        assert (tokens[:, 0] == tok.bos_id).all()
        for row in tokens:  # padding only at the end, images whole
            n = int((row != s.pad).sum())
            assert (row[n:] == s.pad).all() and (row[:n] != s.pad).all()
            starts = (row == s.img_start).nonzero().flatten()
            for p in starts:
                assert (row[p + 1:p + 33] == s.image).all() and row[p + 33] == s.img_end
            assert len(starts) == int((row == s.img_end).sum())


def test_images_listed_in_order_of_appearance(tok, data_path):
    loader = build_pretrain_loader(config(data_path), tok, dp_rank=0, dp_size=1, seed=5)
    batch = next(loader)
    ds = loader.dataset
    expected = []
    for d, draw in ds.slots(0):
        view = ds.views[d]
        from megatron_emu.data.blend import sample_index

        expected += view.build(sample_index(ds.seed, d, draw, len(view)), (ds.seed, d, draw)).images
    assert len(expected) == batch["images"].shape[0]
    for a, b in zip(expected, batch["images"]):
        assert torch.equal(torch.from_numpy(a), b)


def test_shares_are_exact_in_every_global_batch(tok, data_path):
    cfg = config(data_path, global_batch_size=11, micro_batch_size=1)
    loader = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=0)
    want = dict(zip(["pair", "interleaved", "video"], batch_shares([8, 2, 1], 11)))
    assert want == {"pair": 8, "interleaved": 2, "video": 1}
    for _ in range(3):  # three global batches
        got = {}
        for b in take(loader, 11):
            for k, v in b["num_samples_by_kind"].items():
                got[k] = got.get(k, 0) + v
        assert got == want


def test_dp_ranks_read_disjoint_slices_of_the_same_global_batch(tok, data_path):
    cfg = config(data_path, global_batch_size=8, micro_batch_size=2)
    single = torch.cat([b["tokens"] for b in take(build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=9), 8)])
    per_rank = [take(build_pretrain_loader(cfg, tok, dp_rank=r, dp_size=2, seed=9), 4) for r in range(2)]
    # global batch b = rank 0's micro-batches 2b, 2b+1 then rank 1's
    merged = torch.cat([torch.cat([b["tokens"] for b in per_rank[r][2 * g:2 * g + 2]]) for g in range(2) for r in range(2)])
    assert torch.equal(merged, single)


def test_seed_changes_the_stream_and_is_deterministic(tok, data_path):
    a = next(build_pretrain_loader(config(data_path), tok, dp_rank=0, dp_size=1, seed=1))["tokens"]
    b = next(build_pretrain_loader(config(data_path), tok, dp_rank=0, dp_size=1, seed=1))["tokens"]
    c = torch.cat([x["tokens"] for x in take(build_pretrain_loader(config(data_path), tok, dp_rank=0, dp_size=1, seed=2), 4)])
    assert torch.equal(a, b)
    assert not torch.equal(torch.cat([a] * 4), c)


def test_resume_continues_the_stream_exactly(tok, data_path):
    cfg = config(data_path, num_workers=1)
    ref = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=7)
    first = take(ref, 5)
    state = ref.state_dict()
    expected = take(ref, 4)
    resumed = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=7)
    resumed.load_state_dict(state)
    for a, b in zip(expected, take(resumed, 4)):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])
    # Megatron's consumed_samples gives the same start at global-batch boundaries.
    by_samples = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=7, consumed_samples=8)
    assert torch.equal(next(by_samples)["tokens"], first[4]["tokens"])
    assert ref.consumed_samples == 18


def test_cut_data_is_totalled_and_kept_across_resume(tok, data_path):
    # seq 192: a video's 8 frames (272 tokens) cannot all fit, so frames are dropped (counted)
    cfg = config(data_path[4:], seq_length=192)  # the video dataset only
    loader = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=1)
    batches = take(loader, 3)
    for key in ("dropped_images", "truncated_tokens"):
        assert loader.totals[key] == sum(b[key] for b in batches)
    assert loader.totals["dropped_images"] > 0
    resumed = build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=1)
    resumed.load_state_dict(loader.state_dict())
    after = next(resumed)
    assert resumed.totals["dropped_images"] == loader.totals["dropped_images"] + after["dropped_images"]


def test_weighted_blend_policy_runs(tok, data_path):
    loader = build_pretrain_loader(config(data_path, data_blend="weighted"), tok, dp_rank=0, dp_size=1, seed=0)
    kinds = {}
    for b in take(loader, 44):
        for k, v in b["num_samples_by_kind"].items():
            kinds[k] = kinds.get(k, 0) + v
    assert kinds == {"pair": 64, "interleaved": 16, "video": 8}  # 88 samples at 8:2:1


def test_configuration_errors_are_one_line(tok, data_path):
    with pytest.raises(ValueError, match="not a multiple"):
        build_pretrain_loader(config(data_path, global_batch_size=6, micro_batch_size=4), tok,
                              dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="cannot hold one image"):
        build_pretrain_loader(config(data_path, seq_length=20), tok, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="weight"):
        build_pretrain_loader(config(["x", data_path[1]]), tok, dp_rank=0, dp_size=1, seed=0)


def test_wrong_tokenizer_is_refused(tok, data_path, tmp_path):
    six = EmuTokenizer(tok.model_path, num_special_tokens=6)  # same pieces, other vocab size
    with pytest.raises(ValueError, match=r"pairs\.json"):
        build_pretrain_loader(config(data_path), six, dp_rank=0, dp_size=1, seed=0)
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"word{i} other{i * 7} thing" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "o"), vocab_size=100,
                                   model_type="bpe", minloglevel=2, num_threads=1)
    other = EmuTokenizer(str(tmp_path / "o.model"))
    with pytest.raises(ValueError, match="refusing tokenizer"):
        build_pretrain_loader(config(data_path), other, dp_rank=0, dp_size=1, seed=0)


def test_dataclass_defaults_keep_the_contract():
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    assert {"data_path", "seq_length", "micro_batch_size", "global_batch_size", "num_workers", "cache_dir",
            "data_blend", "prefetch_factor"} <= fields


def documents(batch, pad):
    """(tokens, images) of every sample in a batch, packed or not."""
    tokens, images, found, used = batch["tokens"], batch["images"], [], 0
    ids = batch.get("document_ids", torch.zeros_like(tokens))
    for r in range(tokens.shape[0]):
        for d in ids[r].unique().tolist():
            doc = tokens[r][ids[r] == d]
            doc = doc[: int((doc != pad).sum())]  # unpacked rows: drop the trailing [PAD]
            if len(doc) == 0:
                continue  # a packed row's [PAD] document
            n = int((doc == pad + 1).sum())  # [IMG] (= [PAD] + 1) count: images of this sample
            found.append((doc.tolist(), images[used:used + n]))
            used += n
    assert used == images.shape[0]
    return sorted(found, key=lambda x: x[0])


def test_packed_loader_holds_the_same_samples_in_fewer_rows(tok, data_path):
    """--pack-sequences changes the layout, never the samples of a micro-batch."""
    plain = build_pretrain_loader(config(data_path, micro_batch_size=4), tok, dp_rank=0, dp_size=1, seed=5)
    packed = build_pretrain_loader(config(data_path, micro_batch_size=4, pack_sequences=True), tok,
                                   dp_rank=0, dp_size=1, seed=5)
    rows = 0
    for a, b in zip(take(plain, 6), take(packed, 6)):
        assert b["tokens"].shape[1] == 192 and b["tokens"].shape[0] <= 4
        assert b["document_ids"].shape == b["tokens"].shape
        assert b["num_samples_by_kind"] == a["num_samples_by_kind"]
        assert b["truncated_tokens"] == a["truncated_tokens"] and b["dropped_images"] == a["dropped_images"]
        want, got = documents(a, tok.special.pad), documents(b, tok.special.pad)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, want))
        rows += b["tokens"].shape[0]
    assert rows < 6 * 4, "the synthetic corpus's short pairs should share rows"


def test_valid_split_is_disjoint_from_training(tok, data_path):
    """--split: the valid loader serves only the valid range of each dataset, the train
    loader never does; an empty range is refused by name."""
    seen = {}
    for split in ("train", "valid"):
        loader = build_pretrain_loader(config(data_path, split="90,10,0"), tok, dp_rank=0, dp_size=1, seed=1, split=split)
        views = loader.dataset.views
        seen[split] = [(v.start, v.stop) for v in views]
        for batch in take(loader, 3):
            assert batch["tokens"].shape[0] == 2
    for (t0, t1), (v0, v1) in zip(seen["train"], seen["valid"]):
        assert t0 == 0 and t1 == v0 and v1 > v0  # adjacent, disjoint ranges
    with pytest.raises(ValueError, match="the test split .* is empty"):
        build_pretrain_loader(config(data_path, split="90,10,0"), tok, dp_rank=0, dp_size=1, seed=1, split="test")
