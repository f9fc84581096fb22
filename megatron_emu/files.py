"""Small file helpers shared across the package."""

from __future__ import annotations

import json
import os


def read_json(path: str, problem: str, reason_type_only: bool = False) -> dict:
    """The JSON in `path`. A missing or malformed file is one ValueError naming the file:
    "{path}: {problem} ({reason})"; reason_type_only gives the error's type, not its text."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        reason = e.__class__.__name__ if reason_type_only else e
        raise ValueError(f"{path}: {problem} ({reason})") from None


def write_text_atomic(path: str, text: str) -> None:
    """Temp file (`<path>.tmp.<pid>`) + fsync + os.replace: a reader sees the old file or the
    whole new one, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, value: dict) -> None:
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))
