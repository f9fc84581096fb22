"""One evaluation sample, whatever the benchmark, and the file helpers every reader shares.

Readers (coco_files.py, vqa_files.py, visdial_files.py, video_files.py) turn a benchmark's
own public annotation files into `Sample`s; nothing is downloaded. A bad file is one line
naming it and what is wrong.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Sample:
    key: str  # unique in the benchmark: question id, image id, "image_id/round"
    visual: str  # image file, or video file / frame directory
    question: str = ""
    references: list[str] = field(default_factory=list)  # captions, the annotators' answers, the answer
    candidates: list[str] = field(default_factory=list)  # answer options scored by likelihood
    target: int = -1  # index of the right candidate
    relevance: list[float] = field(default_factory=list)  # VisDial dense relevance of each candidate
    history: list[tuple[str, str]] = field(default_factory=list)  # VisDial: earlier (question, answer)
    question_type: str = ""  # NExT-OE: CW CH TN TC DL DB DC DO (WUPS's groups; DB / DC exact match)

    @property
    def answer(self) -> str:
        """The answer an in-context example shows: the right option, else the most common reference."""
        if self.candidates and self.target >= 0:
            return self.candidates[self.target]
        return Counter(self.references).most_common(1)[0][0] if self.references else ""


def read_json(path: str, what: str):
    if not path:
        raise ValueError(f"{what}: no file given")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what} file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def read_csv(path: str, what: str, columns: list[str]) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what} file") from None
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing or not rows:
        raise ValueError(f"{path}: {what} needs the columns {columns}" + (f"; missing {missing}" if rows else "; empty"))
    return rows


def field_of(record: dict, name: str, path: str, where: str):
    """record[name], or one line saying which file and record lack it."""
    if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{path}: {where} has no '{name}' field")
    return record[name]


def existing(path: str, what: str, annotations: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"{path}: {what} named by {annotations} not found")
    return path
