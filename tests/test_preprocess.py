"""tools/preprocess_data.py: round trips per input type, megatron-core compatibility,
workers/resume, and every bad input (skipped and named, or refused with one line)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, MultimodalIndexed
from megatron_emu.data.preprocess import prepare_image
from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import preprocess_data  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return EmuTokenizer(build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tokenizer")))


def png(path, colour, size=(300, 240)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def run(tok, *args):
    return preprocess_data.main([*map(str, args), "--tokenizer-model", tok.model_path, "--no-progress"])


@pytest.fixture
def pairs_jsonl(tmp_path):
    lines = [{"image": png(tmp_path / f"{i}.png", (40 * i, 100, 200)), "caption": f"a blue square number {i}"}
             for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path, lines


def test_pairs_jsonl_round_trip_and_megatron_core_reads_it(tok, tmp_path, pairs_jsonl):
    path, lines = pairs_jsonl
    report = run(tok, "--input-type", "pairs", "--input", path, "--output-prefix", tmp_path / "out/p",
                 "--image-format", "raw")  # pixels compared exactly
    assert report["documents_out"] == 3 and report["images_kept"] == 3 and report["skipped"] == {}
    data = MultimodalIndexed(str(tmp_path / "out/p"), tok.fingerprint)
    for d, line in enumerate(lines):
        (m0, ids), (m1, img) = data.read_document(d)
        assert (m0, m1) == (MODE_TEXT, MODE_IMAGE)
        assert ids.tolist() == tok.encode(line["caption"])
        assert np.array_equal(img, prepare_image(line["image"]))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out/p"), multimodal=True)
    assert len(ds) == 6 and list(ds.document_indices) == [0, 2, 4, 6]
    assert list(ds.index.sequence_modes) == [MODE_TEXT, MODE_IMAGE] * 3
    tokens, mode = ds[0]
    assert mode == MODE_TEXT and tokens.tolist() == tok.encode(lines[0]["caption"])


def test_prepare_image_resizes_and_centre_crops():
    img = Image.new("RGB", (448, 300), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 300))  # a red band cut away by the centre crop
    out = prepare_image(img)
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8 and out[0].max() == 0


def test_webdataset_shards_with_workers_equal_single_process(tok, tmp_path):
    shards = []
    for s in range(3):
        path = tmp_path / f"shard{s}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(2):
                buf = io.BytesIO()
                Image.new("RGB", (256, 256), (s * 80, k * 120, 30)).save(buf, "PNG")
                for name, payload in ((f"{s}{k}.png", buf.getvalue()),
                                      (f"{s}{k}.json", json.dumps({"caption": f"shard {s} item {k}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(path)
    one = run(tok, "--input-type", "pairs", "--input", *shards, "--output-prefix", tmp_path / "w1")
    two = run(tok, "--input-type", "pairs", "--input", *shards, "--output-prefix", tmp_path / "w2", "--workers", "2")
    assert one["documents_out"] == two["documents_out"] == 6
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    data = MultimodalIndexed(str(tmp_path / "w1"), tok.fingerprint)
    assert tok.decode(data.read_document(5)[0][1]) == "shard 2 item 1"


def test_resume_skips_finished_shards(tok, tmp_path, pairs_jsonl):
    path, _ = pairs_jsonl
    other = tmp_path / "pairs2.jsonl"
    shutil.copy(path, other)
    args = ["--input-type", "pairs", "--input", path, other, "--output-prefix", tmp_path / "r", "--keep-parts"]
    first = run(tok, *args)
    os.remove(tmp_path / "r.parts/00001.json")  # shard 1 "interrupted"
    second = run(tok, *args, "--resume")
    assert second["shards_resumed"] == 1 and second["documents_out"] == first["documents_out"] == 6
    assert (tmp_path / "r.bin").stat().st_size > 0


def test_mmc4_images_go_before_their_matched_text(tok, tmp_path):
    doc = {"text_list": ["intro text", "a cat sits", "the end"],
           "image_info": [{"image_name": png(tmp_path / "a.png", (255, 0, 0)), "matched_text_index": 1},
                          {"image_name": png(tmp_path / "b.png", (0, 255, 0)), "matched_text_index": 2},
                          {"image_name": str(tmp_path / "gone.png"), "matched_text_index": 0}]}
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    report = run(tok, "--input-type", "mmc4", "--input", path, "--output-prefix", tmp_path / "m", "--image-format", "raw")
    assert report["skipped"] == {"missing_file": 1} and report["images_kept"] == 2
    data = MultimodalIndexed(str(tmp_path / "m"), tok.fingerprint)
    assert data.kind == "interleaved"
    items = data.read_document(0)
    assert [m for m, _ in items] == [MODE_TEXT, MODE_IMAGE, MODE_TEXT, MODE_IMAGE, MODE_TEXT]
    assert items[1][1][0, 0, 0] == 255 and items[3][1][1, 0, 0] == 255
    assert tok.decode(items[2][1]) == "a cat sits"


def test_video_frames_sampled_in_order_with_srt_subtitles(tok, tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for k in range(16):
        png(frames / f"{k:04d}.png", (k * 15, 0, 0), size=(224, 224))
    (tmp_path / "clip.srt").write_text("1\n00:00:00,000 --> 00:00:03,000\nhello there\n\n"
                                       "2\n00:00:09,000 --> 00:00:12,000\nstill moving\n")
    (tmp_path / "few").mkdir()
    png(tmp_path / "few/0.png", (0, 0, 0))
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text(json.dumps({"video": "clip", "fps": 1, "subtitles": "clip.srt"}) + "\n"
                        + json.dumps({"video": "few", "subtitles": []}) + "\n")
    report = run(tok, "--input-type", "video", "--input", manifest, "--output-prefix", tmp_path / "v", "--image-format", "raw")
    assert report["documents_out"] == 1 and report["skipped"] == {"too_few_frames": 1}
    items = MultimodalIndexed(str(tmp_path / "v"), tok.fingerprint).read_document(0)
    reds = [int(v[0, 0, 0]) for m, v in items if m == MODE_IMAGE]
    assert reds == [k * 15 for k in (1, 3, 5, 7, 9, 11, 13, 15)]  # centres of 8 segments of 16
    order = ["T" if m == MODE_TEXT else "F" for m, _ in items]
    # frames at 1, 3, ..., 15 s; "hello" at 0 s; "still moving" at 9 s, after the 9 s frame (ties: frame first)
    assert "".join(order) == "TFFFFFTFFF"


def test_bad_inputs_are_skipped_counted_and_named(tok, tmp_path):
    png(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    png(tmp_path / "tiny.png", (1, 2, 3), size=(8, 8))
    rows = [{"image": "ok.png", "caption": "fine"}, {"image": "corrupt.png", "caption": "x"},
            {"image": "missing.png", "caption": "x"}, {"image": "tiny.png", "caption": "x"},
            {"image": "ok.png", "caption": "   "}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    broken_tar = tmp_path / "broken.tar"
    broken_tar.write_bytes(b"this is not a tar archive at all" * 40)
    report = run(tok, "--input-type", "pairs", "--input", path, broken_tar, tmp_path / "absent.tar",
                 "--output-prefix", tmp_path / "b")
    assert report["documents_out"] == 1
    for reason in ("corrupt_image", "missing_file", "too_small", "empty_text", "bad_record"):
        assert report["skipped"][reason] == 1, reason
    assert report["skipped"]["unreadable_shard"] == 2
    names = " ".join(s["name"] for s in report["skipped_items"])
    assert "bad.jsonl:2" in names and "missing.png" in names and "broken.tar" in names and "absent.tar" in names
    corrupt = [s["name"] for s in report["skipped_items"] if s["reason"] == "corrupt_image"]
    assert corrupt == [f"{path}:2#1 ({tmp_path / 'corrupt.png'})"]  # the image path, as for a missing one


def test_damaged_outputs_and_wrong_tokenizer_are_refused(tok, tmp_path, pairs_jsonl):
    path, _ = pairs_jsonl
    for name in ("a", "b"):
        run(tok, "--input-type", "pairs", "--input", path, "--output-prefix", tmp_path / name)
    bin_a = tmp_path / "a.bin"
    bin_a.write_bytes(bin_a.read_bytes()[:-100])  # truncated .bin
    with pytest.raises(ValueError, match=r"a\.bin.*truncated"):
        MultimodalIndexed(str(tmp_path / "a"), tok.fingerprint)
    # .idx of another dataset next to this .bin (metadata updated to match sizes)
    shutil.copy(tmp_path / "b.bin", tmp_path / "c.bin")
    (tmp_path / "c.idx").write_bytes((tmp_path / "b.idx").read_bytes()[:-1] + b"\x00")
    meta = json.loads((tmp_path / "b.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps(meta))
    shutil.copy(tmp_path / "a.idx", tmp_path / "d.idx")
    shutil.copy(tmp_path / "b.bin", tmp_path / "d.bin")
    meta_d = dict(meta, bin_bytes=(tmp_path / "d.bin").stat().st_size, idx_bytes=(tmp_path / "d.idx").stat().st_size)
    (tmp_path / "d.json").write_text(json.dumps(meta_d))
    (tmp_path / "d.bin").write_bytes((tmp_path / "d.bin").read_bytes() + b"\x00\x00")
    meta_d["bin_bytes"] += 2
    (tmp_path / "d.json").write_text(json.dumps(meta_d))
    with pytest.raises(ValueError, match=r"d\.idx.*mismatched"):
        MultimodalIndexed(str(tmp_path / "d"), tok.fingerprint)
    with pytest.raises(ValueError, match=r"b\.json.*refusing tokenizer"):
        MultimodalIndexed(str(tmp_path / "b"), "0123456789abcdef")
    with pytest.raises(ValueError, match=r"nothing\.json"):
        MultimodalIndexed(str(tmp_path / "nothing"), tok.fingerprint)


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools/preprocess_data.py"), "--input-type", "pairs",
                          "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", str(tmp_path / "no.model")],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_is_one_line_and_resume_finishes_byte_identical(tok, tmp_path, pairs_jsonl, monkeypatch, workers):
    """The disk fills while the second shard's .bin is written (in a forked worker with 2):
    one line naming the output and what to do, not a shard counted as unreadable input; the
    first shard's finished part is kept (one process); after space is freed, --resume redoes
    what was not finished and writes what one uninterrupted run writes."""
    import errno

    from megatron_emu.data import checksums

    path, _ = pairs_jsonl
    other = tmp_path / "pairs2.jsonl"
    shutil.copy(path, other)
    args = ["--input-type", "pairs", "--input", path, other, "--workers", workers]
    run(tok, *args, "--output-prefix", tmp_path / "clean")
    real_write, writes = checksums.HashingWriter.write, []

    def fill_up(self, data):
        if "00001" in self.file.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(checksums.HashingWriter, "write", fill_up)
    prefix = tmp_path / "full"
    with pytest.raises(ValueError, match=rf"^{prefix}: No space left on device; free space, "
                                         r"then run the same command with --resume: finished shards are kept$"):
        run(tok, *args, "--output-prefix", prefix)
    assert not os.path.exists(f"{prefix}.parts/00001.json") and not os.path.exists(f"{prefix}.json")
    kept = os.path.exists(f"{prefix}.parts/00000.json")
    assert kept or workers > 1  # one process finished shard 0 before shard 1 failed
    monkeypatch.setattr(checksums.HashingWriter, "write", real_write)
    report = run(tok, *args, "--output-prefix", prefix, "--resume")
    assert report["shards_resumed"] == int(kept) and report["skipped"] == {}
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"full{suffix}").read_bytes() == (tmp_path / f"clean{suffix}").read_bytes()
