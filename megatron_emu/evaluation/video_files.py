"""Video question answering files. Videos are files (any PyAV format) or frame directories,
looked up under --video-dir by the name the benchmark gives them.

- MSRVTT-QA: test_qa.json [{"id", "video_id": 7010, "question", "answer"}] -> video7010.*
- MSVD-QA: test_qa.json [{"id", "video_id": 1, "question", "answer"}] -> the name youtube_mapping.txt
  gives "vid1" (lines "-4wsuPCjDBc_5_15 vid1");
- NExT-QA (multiple choice): test.csv / val.csv with video, question, answer (the right
  option's index), qid, a0..a4; map_vid_vidorID.json {"<video>": "<dir>/<name>"} -> <dir>/<name>.*
- NExT-QA open-ended (NExT-OE, the paper's): test.csv / val.csv with video, frame_count, width,
  height, question, answer (the text), qid, type (CW CH TN TP TC DL DB DC DO); optionally
  add_reference_answer_<split>.json {"<video>": {"<qid>": "second answer"}}; the same video map.
"""

from __future__ import annotations

import glob
import os

from megatron_emu.evaluation.samples import Sample, field_of, read_csv, read_json

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")
NEXT_QA_OPTIONS = 5


def find_video(video_dir: str, name: str, annotations: str) -> str:
    """<video_dir>/<name> as a frame directory or a video file of any known suffix."""
    base = os.path.join(video_dir, name)
    if os.path.isdir(base):
        return base
    for path in [base + s for s in VIDEO_SUFFIXES] + sorted(glob.glob(glob.escape(base) + ".*")):
        if os.path.isfile(path):
            return path
    raise ValueError(f"{base}: video named by {annotations} not found (a frame directory or {'/'.join(VIDEO_SUFFIXES)})")


def read_msvd_mapping(path: str) -> dict[str, str]:
    """youtube_mapping.txt: "<youtube name> vid<N>" -> {"vid<N>": name}."""
    try:
        with open(path, encoding="utf-8") as f:
            pairs = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such MSVD mapping file (youtube_mapping.txt)") from None
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"{path}: each line must be '<youtube name> vid<N>'")
    return {vid: name for name, vid in pairs}


def read_open_video_qa(path: str, video_dir: str, benchmark: str, mapping_path: str = "") -> list[Sample]:
    """MSRVTT-QA / MSVD-QA: open-ended answers (one word, mostly), accuracy by exact match."""
    records = read_json(path, f"{benchmark} annotations")
    if not isinstance(records, list):
        raise ValueError(f"{path}: {benchmark} annotations are a list of questions")
    if benchmark == "msvd_qa" and not mapping_path:
        raise ValueError("msvd_qa: give --video-map youtube_mapping.txt")
    mapping = read_msvd_mapping(mapping_path) if benchmark == "msvd_qa" else None
    samples = []
    for i, r in enumerate(records):
        video_id = field_of(r, "video_id", path, f"record {i}")
        name = mapping.get(f"vid{video_id}") if mapping is not None else f"video{video_id}"
        if name is None:
            raise ValueError(f"{mapping_path}: no line for vid{video_id} (record {i} of {path})")
        samples.append(Sample(str(r.get("id", i)), find_video(video_dir, name, path),
                              question=field_of(r, "question", path, f"record {i}"),
                              references=[str(field_of(r, "answer", path, f"record {i}"))]))
    return samples


def read_next_qa(path: str, video_dir: str, mapping_path: str = "") -> list[Sample]:
    """NExT-QA multiple choice: 5 options scored by likelihood, top-1 accuracy."""
    options = [f"a{i}" for i in range(NEXT_QA_OPTIONS)]
    rows = read_csv(path, "NExT-QA", ["video", "question", "answer", "qid"] + options)
    mapping = read_json(mapping_path, "NExT-QA video map (map_vid_vidorID.json)") if mapping_path else {}
    samples = []
    for row in rows:
        name = mapping.get(row["video"], row["video"])
        target = int(row["answer"])
        if not 0 <= target < NEXT_QA_OPTIONS:
            raise ValueError(f"{path}: question {row['video']}_{row['qid']} answer {target} is not an option index 0..4")
        samples.append(Sample(f"{row['video']}_{row['qid']}", find_video(video_dir, name, path),
                              question=row["question"], candidates=[row[o] for o in options], target=target))
    return samples


NEXT_OE_TYPES = ("CW", "CH", "TN", "TP", "TC", "DL", "DB", "DC", "DO")


def read_next_oe(path: str, video_dir: str, mapping_path: str = "", extra_answers_path: str = "") -> list[Sample]:
    """NExT-OE: open-ended answers scored by WUPS (wups.py); references = [answer, additional answer?]."""
    rows = read_csv(path, "NExT-OE", ["video", "question", "answer", "qid", "type"])
    if "a0" in rows[0]:
        raise ValueError(f"{path}: this is NExT-QA's multiple-choice file (a0..a4): use --task nextqa, or give NExT-OE's csv")
    mapping = read_json(mapping_path, "NExT-QA video map (map_vid_vidorID.json)") if mapping_path else {}
    extra = read_json(extra_answers_path, "NExT-OE additional answers (add_reference_answer_*.json)") \
        if extra_answers_path else {}
    samples = []
    for row in rows:
        video, qid = row["video"], row["qid"]
        if row["type"] not in NEXT_OE_TYPES:
            raise ValueError(f"{path}: question {video}_{qid} has type {row['type']!r}, not one of {' '.join(NEXT_OE_TYPES)}")
        references = [row["answer"]] + ([str(extra[video][qid])] if qid in extra.get(video, {}) else [])
        samples.append(Sample(f"{video}_{qid}", find_video(video_dir, mapping.get(video, video), path),
                              question=row["question"], references=references,
                              question_type="TN" if row["type"] == "TP" else row["type"]))  # eval_oe.py: TP counts as TN
    return samples
