"""Sample builders: seeded placement, MMC4 limits, the 5-pair view, video order, image dropping."""

import numpy as np
import pytest

from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, DocumentWriter, MultimodalIndexed
from megatron_emu.data.samples import (
    InterleavedView, PairsWindowView, PairView, SeqSpec, VideoView, assemble, collate,
)
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


def image(value: int) -> np.ndarray:
    return np.full((3, 224, 224), value, dtype=np.uint8)


def text(n: int, start: int = 10) -> np.ndarray:
    return np.arange(start, start + n) % 500


def write(tmp_path, tok, kind, docs):
    prefix = str(tmp_path / kind)
    w = DocumentWriter(prefix, tok.vocab_size)
    for items in docs:
        w.add_document(items)
    w.finalize({"kind": kind, "image_size": 224, "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size})
    return MultimodalIndexed(prefix, tok.fingerprint)


def image_values(sample):
    return [int(img[0, 0, 0]) for img in sample.images]


def test_pair_placement_is_seeded_and_both_ways(tok, tmp_path):
    data = write(tmp_path, tok, "pairs", [[(MODE_TEXT, text(5)), (MODE_IMAGE, image(7))]])
    spec = SeqSpec.from_tokenizer(tok, 64)
    view = PairView(data, spec)
    firsts = []
    for key in range(40):
        a, b = view.build(0, (1, 0, key)), view.build(0, (1, 0, key))
        assert a.tokens == b.tokens  # same key, same placement
        firsts.append(a.tokens[1] == spec.img_start_id)
        assert len(a.tokens) == 1 + 34 + 5 + 1 and a.tokens[-1] == tok.eos_id
    assert 10 < sum(firsts) < 30  # both placements occur


def test_long_caption_is_truncated_never_the_image(tok, tmp_path):
    data = write(tmp_path, tok, "pairs", [[(MODE_TEXT, text(200)), (MODE_IMAGE, image(1))]])
    spec = SeqSpec.from_tokenizer(tok, 64)
    for key in range(6):
        s = PairView(data, spec).build(0, (0, 0, key))
        assert len(s.tokens) == 64 and len(s.images) == 1 and s.dropped_images == 0
        assert s.tokens.count(spec.image_id) == 32


def test_interleaved_chunks_respect_length_and_five_images(tok, tmp_path):
    rng = np.random.default_rng(0)
    docs = []
    for d in range(6):  # 12 images per document, texts of random length
        items = [(MODE_TEXT, text(int(rng.integers(1, 40))))]
        for k in range(12):
            items += [(MODE_IMAGE, image(d * 20 + k)), (MODE_TEXT, text(int(rng.integers(1, 60))))]
        docs.append(items)
    data = write(tmp_path, tok, "interleaved", docs)
    for seq_length in (128, 400, 1024):
        view = InterleavedView(data, SeqSpec.from_tokenizer(tok, seq_length))
        seen = []
        for i in range(len(view)):
            s = view.build(i, ())
            assert len(s.tokens) <= seq_length and len(s.images) <= 5 and s.dropped_images == 0
            assert s.tokens.count(tok.special.image) == 32 * len(s.images)
            seen += image_values(s)
        assert seen == [d * 20 + k for d in range(6) for k in range(12)]  # every image once, in order


def test_long_text_items_continue_in_the_next_interleaved_sequence(tok, tmp_path):
    long_text = text(3 * 64 + 5)  # one MMC4 text item longer than three sequences
    docs = [[(MODE_TEXT, text(7)), (MODE_IMAGE, image(1)), (MODE_TEXT, long_text), (MODE_IMAGE, image(2)),
             (MODE_TEXT, text(20, start=100))],
            [(MODE_TEXT, text(64, start=200))]]  # exactly seq_length: still split, BOS/EOS take room
    data = write(tmp_path, tok, "interleaved", docs)
    spec = SeqSpec.from_tokenizer(tok, 64)
    view = InterleavedView(data, spec)
    samples = [view.build(i, ()) for i in range(len(view))]
    layout = {tok.bos_id, tok.eos_id, spec.img_start_id, spec.img_end_id, spec.image_id}
    stream = [t for s in samples for t in s.tokens if t not in layout]
    expected = [t for d in docs for m, v in d if m == MODE_TEXT for t in v.tolist()]
    assert stream == expected  # every text token once, in order: nothing cut
    assert all(len(s.tokens) <= 64 and s.tokens[0] == tok.bos_id and s.tokens[-1] == tok.eos_id for s in samples)
    assert sum(s.truncated_tokens + s.dropped_images for s in samples) == 0
    assert [image_values(s) for s in samples if s.images] == [[1], [2]]
    # doc 0: text 7 + image + 21 | 62 | 62 | 52 (image 2 does not fit) | image + 20; doc 1: 62 | 2
    assert len(samples) == 7
    assert collate(samples, spec)["truncated_tokens"] == 0


def test_truncation_is_counted_where_a_view_has_no_next_sequence(tok, tmp_path):
    pairs = write(tmp_path, tok, "pairs", [[(MODE_TEXT, text(100)), (MODE_IMAGE, image(1))]])
    spec = SeqSpec.from_tokenizer(tok, 64)
    s = PairView(pairs, spec).build(0, (0, 0, 0))
    assert s.truncated_tokens == 100 - (64 - 1 - 34) and len(s.tokens) == 64
    items = [(MODE_TEXT, text(3))]
    for k in range(5):
        items += [(MODE_IMAGE, image(k)), (MODE_TEXT, text(200))]
    spec_1024 = SeqSpec.from_tokenizer(tok, 1024)
    window = PairsWindowView(write(tmp_path, tok, "interleaved", [items]), spec_1024).build(0, ())
    kept = len(window.tokens) - 1 - 34 * len(window.images)
    assert window.truncated_tokens == 5 * 200 - kept and window.truncated_tokens > 0
    assert collate([s, window], spec_1024)["truncated_tokens"] == s.truncated_tokens + window.truncated_tokens


def test_five_pair_view_is_capped_at_512_tokens(tok, tmp_path):
    items = [(MODE_TEXT, text(3))]
    for k in range(11):
        items += [(MODE_IMAGE, image(k)), (MODE_TEXT, text(90))]
    data = write(tmp_path, tok, "interleaved", [items])
    view = PairsWindowView(data, SeqSpec.from_tokenizer(tok, 1024))
    assert len(view) == 3  # 5 + 5 + 1 pairs
    s = view.build(0, ())
    assert len(s.tokens) <= 512 and image_values(s)[:4] == [0, 1, 2, 3]
    assert len(s.images) + s.dropped_images == 5
    assert image_values(view.build(2, ())) == [10]


def test_video_frames_in_order_with_subtitles_by_timestamp(tok, tmp_path):
    from megatron_emu.data.preprocess import encode_document
    from megatron_emu.data.synthetic import video_document
    from PIL import Image

    frames = [Image.new("RGB", (224, 224), (k * 30, 0, 0)) for k in range(8)]
    times = [k * 0.5 for k in range(8)]
    subs = [(1.2, "it moves up."), (0.0, "a red circle appears.")]  # out of order on purpose
    raw = video_document(frames, times, subs, "clip")
    items = encode_document(raw, tok, 224, __import__("collections").Counter(), [])
    data = write(tmp_path, tok, "video", [items])
    spec = SeqSpec.from_tokenizer(tok, 512)
    s = VideoView(data, spec).build(0, ())
    assert image_values(s) == [k * 30 for k in range(8)]
    decoded = tok.decode(s.tokens)
    frame = "[IMG]" + "<image>" * 32 + "[/IMG]"
    # frame at t=0 before the t=0 subtitle; the t=1.2 subtitle after the frames at 0.5 and 1.0
    assert decoded.startswith(frame + "a red circle appears." + frame * 2 + "it moves up." + frame * 5)
    short = VideoView(data, SeqSpec.from_tokenizer(tok, 128)).build(0, ())
    assert len(short.images) == 3 and short.dropped_images == 5  # dropped whole, counted


def test_assemble_and_collate(tok):
    spec = SeqSpec.from_tokenizer(tok, 40)
    s = assemble([(MODE_TEXT, text(6)), (MODE_IMAGE, image(1)), (MODE_TEXT, text(9))], spec, "x")
    assert len(s.images) == 0 and s.dropped_images == 1  # 1 + 6 + 34 > 40: dropped whole
    t = assemble([(MODE_IMAGE, image(2))], spec, "y")
    batch = collate([s, t], spec)
    assert batch["tokens"].shape == (2, 40) and batch["images"].shape == (1, 3, 224, 224)
    assert batch["dropped_images"] == 1 and batch["num_samples_by_kind"] == {"x": 1, "y": 1}
    assert batch["loss_mask"][1, 1:35].sum() == 0  # image tokens are never CE targets
