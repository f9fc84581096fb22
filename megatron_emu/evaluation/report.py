"""What an evaluation leaves: one JSON per (task, setting) and a Markdown table of them all.

<output-dir>/<task>/<setting>.json: the headline score and corpus metrics, every sample's
prediction, references and scores, the configuration and the checkpoint's identity.
<output-dir>/results.md: one row per task, for each setting (columns "k=0", "k=0*", "k=2",
...) our number beside the paper's (paper.py), as the paper's Tables 1 and 3.
"""

from __future__ import annotations

import glob
import json
import os

import xxhash

from megatron_emu.evaluation.paper import PAPER_NOTES, paper_number
from megatron_emu.evaluation.tasks import TASKS

SETTINGS_ORDER = ["0", "0*", "2", "4", "8"]


def checkpoint_identity(path: str) -> dict:
    """Where the weights came from and what they were: the iteration and the hash of the
    checkpoint's checksums.json (our checkpoints), else of the file / HF export's weights."""
    from megatron_emu.training.checkpoint_files import iteration_dir, read_latest

    identity = {"path": os.path.abspath(path)}
    target = path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ".metadata")):
        latest = read_latest(path)
        if latest is not None:
            identity["iteration"] = latest
            target = iteration_dir(path, latest)
    files = [os.path.join(target, "checksums.json")] if os.path.isfile(os.path.join(target, "checksums.json")) else \
        ([target] if os.path.isfile(target) else sorted(glob.glob(os.path.join(target, "**", "*.safetensors"), recursive=True)))
    digest = xxhash.xxh3_64()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    identity["xxh3"] = digest.hexdigest()
    identity["hashed"] = [os.path.relpath(f, target) if f != target else os.path.basename(f) for f in files]
    return identity


def write_result(output_dir: str, task: str, setting: str, result: dict) -> str:
    path = os.path.join(output_dir, task, f"{setting}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def read_results(output_dir: str) -> list[dict]:
    results = []
    for path in sorted(glob.glob(os.path.join(output_dir, "*", "*.json"))):
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    return results


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(results: list[dict]) -> str:
    """Rows: tasks; columns: for each setting evaluated, ours | paper."""
    settings = [s for s in SETTINGS_ORDER if any(r["setting"] == s for r in results)]
    settings += sorted({r["setting"] for r in results} - set(settings))
    tasks = [t for t in list(TASKS) + ["coco_fid"] if any(r["task"] == t for r in results)]
    by = {(r["task"], r["setting"]): r for r in results}
    header = ["task", "metric"] + [f"k={s} {who}" for s in settings for who in ("ours", "paper")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for task in tasks:
        first = next(r for r in results if r["task"] == task)
        row = [task, first["metric"]]
        for s in settings:
            r = by.get((task, s))
            row += [_cell(r["score"] if r else None), _cell(paper_number(first["config"]["model"], task, s))]
        lines.append("| " + " | ".join(row) + " |")
        if task in PAPER_NOTES:
            notes.append(f"- {task}: {PAPER_NOTES[task]}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_table(output_dir: str) -> str:
    table = markdown_table(read_results(output_dir))
    path = os.path.join(output_dir, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(table)
    return table
