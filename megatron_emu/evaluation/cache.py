"""Per-sample predictions on disk, so an interrupted evaluation resumes where it stopped.

One directory per (task, setting, fingerprint of everything that changes an answer:
checkpoint, prompt style, decoding, annotation files); each writing rank appends JSON lines
to its own file and syncs them after every batch. On start every rank reads all the files
of the directory, whatever DP size wrote them: a sample found there is not answered again.
A line cut short by a kill is ignored (its sample is answered again) and counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class PredictionCache:
    def __init__(self, directory: str, rank: int, writes: bool):
        self.directory = directory
        self.path = os.path.join(directory, f"rank{rank:05d}.jsonl")
        self.writes = writes
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        self._read()

    def _read(self) -> None:
        for path in sorted(glob.glob(os.path.join(self.directory, "rank*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        self.torn_lines += 1  # the last line of a killed writer
                        continue
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, records: list[dict]) -> None:
        """Remember and (on a writing rank) durably append these predictions."""
        for record in records:
            self.records[record["key"]] = record
        if not self.writes or not records:
            return
        os.makedirs(self.directory, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # after a torn line: start a fresh one
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
