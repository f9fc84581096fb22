"""Readers for raw inputs: one shard (input file) -> RawDocuments or SkipItems.

- pairs: WebDataset .tar shards (image member + .txt / .json caption sharing a key),
  JSONL lines {"image": path, "caption": text}, or parquet with the same columns
  (pyarrow, optional; an "image" column may also hold encoded bytes);
- mmc4:  JSONL lines {"text_list": [...], "image_info": [{"image_name": path,
  "matched_text_index": i}, ...]}; images go right before their matched sentence;
- video: JSONL manifest lines {"video": frames folder or video file, "fps": frames per
  second of the folder (default 1), "subtitles": [{"start": s, "end": s, "text": ...}] or
  an .srt / .vtt path}; 8 frames are sampled uniformly, then interleaved with the
  subtitles by timestamp. Video files are decoded with PyAV (optional dependency).

Relative paths are resolved against the directory of the file that names them.
Readers never raise for one bad record: they yield SkipItem(reason, name).
"""

from __future__ import annotations

import json
import os
import re
import tarfile

from megatron_emu.data.images import SkipItem
from megatron_emu.data.media import IMAGE_EXTS, resolve, sample_frames
from megatron_emu.data.synthetic import RawDocument, video_document



def iter_source(input_type: str, path: str):
    from megatron_emu.data.instruct_sources import READERS as INSTRUCT_READERS

    readers = {"pairs": _pairs, "mmc4": _mmc4, "video": _video, **INSTRUCT_READERS}
    if input_type not in readers:
        raise ValueError(f"unknown input type {input_type!r}; choose one of {sorted(readers)}")
    if not os.path.exists(path):
        yield SkipItem("unreadable_shard", f"{path} (missing)")
        return
    yield from readers[input_type](path)


def _jsonl(path: str):
    """(line number, dict) per line; bad lines become SkipItems."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                yield n, SkipItem("bad_record", f"{path}:{n}")
                continue
            yield n, rec


# --- image-text pairs ------------------------------------------------------------------
def _pairs(path: str):
    if path.endswith(".tar"):
        yield from _webdataset(path)
    elif path.endswith(".parquet"):
        yield from _parquet(path)
    else:
        for n, rec in _jsonl(path):
            if isinstance(rec, SkipItem):
                yield rec
                continue
            image = rec.get("image", rec.get("image_path"))
            caption = rec.get("caption", rec.get("text", ""))
            if not isinstance(image, str):
                yield SkipItem("bad_record", f"{path}:{n} (no image path)")
                continue
            yield RawDocument("pairs", [("text", caption or ""), ("image", resolve(path, image))], f"{path}:{n}")


def _webdataset(path: str):
    """Members grouped by key (name up to the first dot), in archive order."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                groups.setdefault(key, {})["." + ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        # What was read before the damage is still used; the shard is named in the report.
        yield SkipItem("unreadable_shard", f"{path} ({e.__class__.__name__}: {e})")
    for key, files in groups.items():
        name = f"{path}:{key}"
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        if image is None:
            yield SkipItem("missing_file", f"{name} (no image member)")
            continue
        caption = _tar_caption(files)
        yield RawDocument("pairs", [("text", caption), ("image", image)], name)


def _tar_caption(files: dict[str, bytes]) -> str:
    if ".txt" in files:
        return files[".txt"].decode("utf-8", errors="replace")
    if ".json" in files:
        try:
            meta = json.loads(files[".json"])
            return str(meta.get("caption", meta.get("text", "")))
        except ValueError:
            return ""
    return ""


def _parquet(path: str):
    """Streamed in record batches of the two needed columns: LAION parquet shards with
    embedded image bytes are too big to load whole, and carry many other columns."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)
    cols = table.schema_arrow.names
    image_col = next((c for c in ("image", "image_path", "jpg", "png") if c in cols), None)
    text_col = next((c for c in ("caption", "text", "TEXT", "txt") if c in cols), None)
    if image_col is None or text_col is None:
        raise ValueError(f"{path}: parquet needs an image and a caption column, has {cols}")
    n = 0
    for batch in table.iter_batches(batch_size=256, columns=[image_col, text_col]):
        for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if isinstance(image, dict):  # HF datasets style {"bytes": ..., "path": ...}
                image = image.get("bytes") or image.get("path")
            if isinstance(image, str):
                image = resolve(path, image)
            if image is None:
                yield SkipItem("missing_file", f"{path}:row{n} (no image)")
            else:
                yield RawDocument("pairs", [("text", caption or ""), ("image", image)], f"{path}:row{n}")
            n += 1


# --- interleaved documents (MMC4) -----------------------------------------------------------
def _mmc4(path: str):
    for n, rec in _jsonl(path):
        if isinstance(rec, SkipItem):
            yield rec
            continue
        texts = rec.get("text_list")
        if not isinstance(texts, list):
            yield SkipItem("bad_record", f"{path}:{n} (no text_list)")
            continue
        before: dict[int, list] = {}
        for info in rec.get("image_info", []):
            image = info.get("image_name", info.get("image_path", info.get("path")))
            idx = info.get("matched_text_index", 0)
            if not isinstance(image, str) or not isinstance(idx, int) or not 0 <= idx <= max(len(texts) - 1, 0):
                yield SkipItem("bad_record", f"{path}:{n} (bad image_info {info})")
                continue
            before.setdefault(idx, []).append(resolve(path, image))
        items = []
        for i, text in enumerate(texts or [""]):
            items += [("image", p) for p in before.get(i, [])]
            if i < len(texts):
                items.append(("text", text))
        yield RawDocument("interleaved", items, f"{path}:{n}")


# --- video-text ------------------------------------------------------------------------------
def _video(path: str):
    for n, rec in _jsonl(path):
        if isinstance(rec, SkipItem):
            yield rec
            continue
        name = f"{path}:{n}"
        video = rec.get("video")
        if not isinstance(video, str):
            yield SkipItem("bad_record", f"{name} (no video)")
            continue
        video = resolve(path, video)
        try:
            subtitles = _subtitles(path, rec.get("subtitles", []))
            frames, times = sample_frames(video, float(rec.get("fps", 1.0)))
        except SkipItem as s:
            yield SkipItem(s.reason, f"{name}: {s.name}")
            continue
        yield video_document(frames, times, subtitles, name)


_TIME = r"(\d+):(\d\d):(\d\d)[,.](\d{3})"


def _subtitles(base_file: str, subs) -> list[tuple[float, str]]:
    """[(start seconds, text)] from a JSON list or an .srt / .vtt file."""
    if isinstance(subs, str):
        sub_path = resolve(base_file, subs)
        if not os.path.exists(sub_path):
            raise SkipItem("missing_file", sub_path)
        with open(sub_path, encoding="utf-8", errors="replace") as f:
            return _parse_srt(f.read())
    out = []
    for s in subs:
        if not isinstance(s, dict) or "start" not in s:
            raise SkipItem("bad_record", f"subtitle {s!r}")
        out.append((float(s["start"]), str(s.get("text", ""))))
    return out


def _parse_srt(text: str) -> list[tuple[float, str]]:
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        lines = block.strip().split("\n")
        for k, line in enumerate(lines):
            m = re.match(_TIME + r"\s*-->", line.strip())
            if m:
                h, mi, s, ms = (int(x) for x in m.groups())
                out.append((h * 3600 + mi * 60 + s + ms / 1000, " ".join(lines[k + 1:]).strip()))
                break
    return out
