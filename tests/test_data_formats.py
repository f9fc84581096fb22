"""Stored image formats (raw, jpeg), dataset checksums, and bad stored samples named by
dataset prefix, document and sequence when the loader reads them."""

import io
import json
import shutil
import warnings

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from megatron_emu.config import DataConfig
from megatron_emu.data import indexed
from megatron_emu.data.images import decode_jpeg
from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, MultimodalIndexed
from megatron_emu.data.loader import build_pretrain_loader
from megatron_emu.data.preprocess import Shard, preprocess, synthetic_shards
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

# The floor stated for JPEG_QUALITY 90, 4:2:0 (BENCHMARKS.md: 30.6 dB worst, 32.1 mean, on noisy photo-like images).
MIN_PSNR_DB = 30.0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


def synthetic(tok, prefix, image_format, n=4, kind="pairs", seed=0):
    preprocess(synthetic_shards(kind, n, seed), str(prefix), kind, tok.model_path, image_format=image_format,
               progress=False)
    return str(prefix)


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-12)))


def image_bytes(data, item) -> bytes:
    return data.ds.get(item)[0].view(np.uint8).tobytes()


def test_jpeg_round_trip_within_the_stated_psnr_and_10x_smaller(tok, tmp_path):
    raw = MultimodalIndexed(synthetic(tok, tmp_path / "raw", "raw"))
    jpeg = MultimodalIndexed(synthetic(tok, tmp_path / "jpeg", "jpeg"))
    assert (raw.image_format, jpeg.image_format) == ("raw", "jpeg")
    for doc in range(len(raw)):
        for (m_raw, v_raw), (m_jpg, v_jpg) in zip(raw.read_document(doc), jpeg.read_document(doc)):
            assert m_raw == m_jpg
            if m_raw == MODE_TEXT:
                assert np.array_equal(v_raw, v_jpg)
            else:
                assert v_jpg.dtype == np.uint8 and v_jpg.shape == (3, 224, 224)
                assert psnr(v_raw, v_jpg) >= MIN_PSNR_DB
    assert (tmp_path / "jpeg.bin").stat().st_size * 10 < (tmp_path / "raw.bin").stat().st_size
    # Still megatron-core's format: its own reader opens it and hands back the JPEG bytes.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "jpeg"), multimodal=True)
    image_item = int(np.flatnonzero(ds.index.sequence_modes == MODE_IMAGE)[0])
    assert ds[image_item][0].view(np.uint8)[:2].tobytes() == b"\xff\xd8"  # JPEG start-of-image


def test_photo_like_image_round_trip_within_the_stated_psnr():
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
    pixels = (np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (224, 224, 3))).clip(0, 255).astype(np.uint8)
    chw = pixels.transpose(2, 0, 1)
    from megatron_emu.data.images import encode_jpeg

    assert psnr(chw, decode_jpeg(encode_jpeg(chw), 224)) >= MIN_PSNR_DB


def test_a_224px_baseline_jpeg_is_stored_as_it_came_others_re_encoded(tok, tmp_path):
    rng = np.random.default_rng(1)
    exact = simplejpeg.encode_jpeg(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), quality=75,
                                   colorspace="RGB")
    (tmp_path / "exact.jpg").write_bytes(exact)
    big = io.BytesIO()  # 448 px: libjpeg's draft() decodes it at 224, yet it is not a 224 px input
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(big, "JPEG", quality=95)
    (tmp_path / "big.jpg").write_bytes(big.getvalue())
    progressive = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(progressive, "JPEG", progressive=True)
    (tmp_path / "progressive.jpg").write_bytes(progressive.getvalue())
    lines = [{"image": str(tmp_path / n), "caption": "a photo"} for n in ("exact.jpg", "big.jpg", "progressive.jpg")]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    preprocess([Shard(0, "pairs", str(tmp_path / "pairs.jsonl"), "pairs.jsonl")], str(tmp_path / "p"), "pairs",
               tok.model_path, image_format="jpeg", progress=False)
    data = MultimodalIndexed(str(tmp_path / "p"))
    stored = [image_bytes(data, i) for i in range(len(data.lengths)) if data.modes[i] == MODE_IMAGE]
    assert stored[0].rstrip(b"\0") == exact.rstrip(b"\0")  # byte for byte (zero padding to whole tokens only)
    assert stored[1] != big.getvalue() and stored[2] != progressive.getvalue()  # re-encoded at 224, baseline
    assert Image.open(io.BytesIO(stored[1])).size == (224, 224)
    for doc in range(3):
        assert data.read_document(doc)[1][1].shape == (3, 224, 224)


def corrupt_first_image(prefix: str, doc: int) -> int:
    """Overwrites the start-of-image marker of document doc's image; returns its sequence."""
    data = MultimodalIndexed(prefix)
    item = next(i for i in data.item_range(doc) if data.modes[i] == MODE_IMAGE)
    pointer = int(data.ds.index.sequence_pointers[item])
    with open(prefix + ".bin", "r+b") as f:
        f.seek(pointer)
        f.write(b"\x00\x00\x00\x00")
    return item


def overwrite_first_token(prefix: str, doc: int, value: int = 65535) -> int:
    data = MultimodalIndexed(prefix)
    item = next(i for i in data.item_range(doc) if data.modes[i] == MODE_TEXT)
    with open(prefix + ".bin", "r+b") as f:
        f.seek(int(data.ds.index.sequence_pointers[item]))
        f.write(np.array([value], dtype=data.dtype).tobytes())
    return item


def loader_over(prefix, tok, num_workers):
    cfg = DataConfig(data_path=[prefix], seq_length=128, micro_batch_size=4, global_batch_size=4,
                     num_workers=num_workers)
    return build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_stored_jpeg_is_one_line_naming_prefix_document_sequence(tok, tmp_path, num_workers):
    prefix = synthetic(tok, tmp_path / "j", "jpeg")
    item = corrupt_first_image(prefix, 2)
    with pytest.raises(ValueError) as e:
        MultimodalIndexed(prefix).read_document(2)
    assert str(e.value).startswith(f"{prefix}: document 2, sequence {item}: corrupt JPEG")
    with pytest.raises(ValueError) as e:  # the 4 samples of the first batch cover all 4 documents
        next(loader_over(prefix, tok, num_workers))
    assert str(e.value).startswith(f"{prefix}: document 2, sequence {item}: corrupt JPEG")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_token_outside_the_vocabulary_names_prefix_document_sequence(tok, tmp_path, num_workers):
    prefix = synthetic(tok, tmp_path / "t", "raw")
    item = overwrite_first_token(prefix, 1)
    with pytest.raises(ValueError) as e:
        next(loader_over(prefix, tok, num_workers))
    assert str(e.value) == (f"{prefix}: document 1, sequence {item}: token id 65535 is outside the vocabulary "
                            f"of {tok.vocab_size}")


def test_checksums_recorded_and_a_same_size_idx_of_another_dataset_refused(tok, tmp_path):
    a = synthetic(tok, tmp_path / "a", "jpeg", seed=0)
    b = synthetic(tok, tmp_path / "b", "jpeg", seed=1)
    meta = json.loads((tmp_path / "a.json").read_text())
    from megatron_emu.data.checksums import file_xxh3

    assert meta["bin_xxh3"] == file_xxh3(a + ".bin") and meta["idx_xxh3"] == file_xxh3(a + ".idx")
    assert (tmp_path / "a.idx").stat().st_size == (tmp_path / "b.idx").stat().st_size
    assert (tmp_path / "a.idx").read_bytes() != (tmp_path / "b.idx").read_bytes()
    shutil.copy(b + ".idx", a + ".idx")
    with pytest.raises(ValueError) as e:
        MultimodalIndexed(a)
    assert str(e.value).startswith(f"{a}.idx: checksum xxh3_64 ") and "another dataset" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_dataset_without_checksums_opens_with_one_warning(tok, tmp_path):
    prefix = synthetic(tok, tmp_path / "old", "raw")
    meta = json.loads((tmp_path / "old.json").read_text())
    for key in ("bin_xxh3", "idx_xxh3", "image_format"):  # as written before these existed
        del meta[key]
    (tmp_path / "old.json").write_text(json.dumps(meta))
    indexed._WARNED_NO_CHECKSUM.discard(prefix)
    with pytest.warns(UserWarning, match="records no checksums"):
        data = MultimodalIndexed(prefix)
    assert data.image_format == "raw" and data.read_document(0)[0][0] in (MODE_TEXT, MODE_IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per dataset, not at every open
        MultimodalIndexed(prefix)
