"""Optional readers: video files through PyAV and parquet pair tables through pyarrow.

Real files are written in the test (an h264 .mp4 of known solid colours, parquet tables),
preprocessed through tools/preprocess_data.py and read back. Skipped without av / pyarrow.
"""

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, MultimodalIndexed
from megatron_emu.data.preprocess import prepare_image
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import preprocess_data  # noqa: E402

FPS = 4
# 16 distinct solid colours; h264 (yuv420p) is lossy, so they are compared within a tolerance.
COLOURS = [(int(v), int(255 - v), int(v * 3) % 256) for v in np.linspace(0, 255, 16)]
TOLERANCE = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


def run(tok, *args):
    return preprocess_data.main([*map(str, args), "--tokenizer-model", tok.model_path, "--no-progress"])


def write_video(path, colours, size=(256, 192)):
    """h264 .mp4, one solid-colour frame per entry, FPS frames per second."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for rgb in colours:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), rgb, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


# mp4 states its frame count (only the sampled frames are converted); mkv does not (all kept).
@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_video_file_frames_sampled_in_timestamp_order_with_subtitles(tok, tmp_path, container):
    pytest.importorskip("av")
    write_video(tmp_path / f"clip.{container}", COLOURS)
    write_video(tmp_path / f"short.{container}", COLOURS[:5])
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not really a video" * 50)
    subtitles = [{"start": 3.0, "end": 3.9, "text": "almost purple"},  # out of order on purpose
                 {"start": 0.0, "end": 1.0, "text": "a green screen"},
                 {"start": 1.6, "end": 2.9, "text": "the colours change"}]
    clips = [{"video": f"clip.{container}", "subtitles": subtitles}, {"video": f"short.{container}", "subtitles": []},
             {"video": "broken.mp4", "subtitles": []}, {"video": "gone.mp4", "subtitles": []}]
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("\n".join(json.dumps(c) for c in clips) + "\n")
    report = run(tok, "--input-type", "video", "--input", manifest, "--output-prefix", tmp_path / "v")
    assert report["documents_in"] == 4 and report["documents_out"] == 1
    assert report["skipped"] == {"too_few_frames": 1, "corrupt_video": 1, "missing_file": 1}
    names = " ".join(s["name"] for s in report["skipped_items"])
    assert f"short.{container}" in names and "broken.mp4" in names and "gone.mp4" in names

    items = MultimodalIndexed(str(tmp_path / "v"), tok.fingerprint).read_document(0)
    frames = [v for m, v in items if m == MODE_IMAGE]
    assert len(frames) == 8 and all(f.shape == (3, 224, 224) for f in frames)
    picked = [1, 3, 5, 7, 9, 11, 13, 15]  # centres of 8 equal segments of 16 frames
    for frame, k in zip(frames, picked):
        centre = frame[:, 112, 112].astype(int)
        assert np.abs(centre - np.array(COLOURS[k])).max() <= TOLERANCE, (k, centre, COLOURS[k])
    # frames at 0.25, 0.75, ..., 3.75 s; subtitles at 0.0, 1.6 and 3.0 s go between them
    order = "".join("T" if m == MODE_TEXT else "F" for m, _ in items)
    assert order == "TFFFTFFFTFF"
    texts = [tok.decode(v) for m, v in items if m == MODE_TEXT]
    assert texts == ["a green screen", "the colours change", "almost purple"]


def jpeg_bytes(rgb, size=(320, 240)):
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_parquet_pairs_round_trip(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "img").mkdir()
    paths = []
    for i in range(3):
        Image.new("RGB", (300, 240), (60 * i, 20, 200)).save(tmp_path / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")  # relative to the parquet file
    captions = [f"a picture number {i}" for i in range(3)]
    table = pa.table({"url": [f"http://x/{i}" for i in range(3)], "image_path": paths, "caption": captions,
                      "similarity": [0.3, 0.31, 0.32]})  # extra LAION-style columns are ignored
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=2)  # several row groups
    report = run(tok, "--input-type", "pairs", "--input", tmp_path / "pairs.parquet", "--output-prefix", tmp_path / "p",
                 "--image-format", "raw")  # pixels compared exactly
    assert report["documents_out"] == 3 and report["skipped"] == {}
    data = MultimodalIndexed(str(tmp_path / "p"), tok.fingerprint)
    for d in range(3):
        (m0, ids), (m1, img) = data.read_document(d)
        assert (m0, m1) == (MODE_TEXT, MODE_IMAGE)
        assert tok.decode(ids) == captions[d]
        assert np.array_equal(img, prepare_image(str(tmp_path / paths[d])))


def test_parquet_with_embedded_bytes_and_bad_rows(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = jpeg_bytes((250, 10, 10))
    images = [{"bytes": good, "path": None}, {"bytes": b"corrupt jpeg", "path": None},
              {"bytes": None, "path": "missing.jpg"}, None]
    table = pa.table({"image": images, "text": ["red", "x", "y", "z"]})  # HF datasets layout
    pq.write_table(table, tmp_path / "hf.parquet")
    pq.write_table(pa.table({"image": ["a.png"]}), tmp_path / "nocaption.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    report = run(tok, "--input-type", "pairs", "--input", tmp_path / "hf.parquet", tmp_path / "nocaption.parquet",
                 tmp_path / "garbage.parquet", "--output-prefix", tmp_path / "h")
    assert report["documents_out"] == 1
    assert report["skipped"]["corrupt_image"] == 1 and report["skipped"]["missing_file"] == 2
    assert report["skipped"]["unreadable_shard"] == 2
    names = " ".join(s["name"] for s in report["skipped_items"])
    assert "hf.parquet:row1" in names and "missing.jpg" in names and "hf.parquet:row3" in names
    assert "nocaption.parquet" in names and "caption column" in names and "garbage.parquet" in names
    (_, ids), (_, img) = MultimodalIndexed(str(tmp_path / "h"), tok.fingerprint).read_document(0)
    assert tok.decode(ids) == "red" and np.array_equal(img, prepare_image(good))
