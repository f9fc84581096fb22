"""Small fixtures of the public instruction formats (ShareGPT, Alpaca, LLaVA-Instruct, VideoChat),
written by the tests, each with one good and some bad records."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def save_image(path: str, value: int, size: int = 64) -> str:
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def write_fixtures(root: str, copies: int = 1) -> dict[str, str]:
    """input type -> JSON file. Good records x copies, then the bad ones (one per failure)."""
    os.makedirs(os.path.join(root, "frames"), exist_ok=True)
    save_image(os.path.join(root, "red.png"), 200)
    for i in range(8):
        save_image(os.path.join(root, "frames", f"{i:03d}.png"), 20 * i)
    good = {
        "sharegpt": [{"id": "a", "conversations": [
            {"from": "human", "value": "what is the quick brown fox?"}, {"from": "gpt", "value": "a lazy dog."},
            {"from": "human", "value": "how many objects are there?"}, {"from": "gpt", "value": "there are two."}]}],
        "alpaca": [{"instruction": "describe the picture.", "input": "a red shape", "output": "it is red."}],
        "llava": [{"id": "l", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nwhich colour is it?"}, {"from": "gpt", "value": "red."}]}],
        "videochat": [{"video": "frames", "QA": [{"q": "what does the video show?", "a": "an object moving."}]}],
    }
    bad = {
        "sharegpt": [{"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "q"}]},
                     {"conversations": []}, "not an object"],
        "alpaca": [{"instruction": "", "output": "x"}, {"instruction": 3, "output": "x"}],
        "llava": [{"image": "missing.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
        "videochat": [{"video": "frames", "QA": [{"q": "no answer"}]}, {"QA": []}],
    }
    paths = {}
    for kind in good:
        paths[kind] = os.path.join(root, f"{kind}.json")
        with open(paths[kind], "w") as f:
            json.dump(good[kind] * copies + bad[kind], f)
    return paths


BAD_COUNTS = {  # input type -> (skip reason -> count) for write_fixtures' bad records
    "sharegpt": {"bad_turns": 2, "bad_record": 1},
    "alpaca": {"empty_text": 1, "bad_record": 1},
    "llava": {"missing_file": 1},
    "videochat": {"bad_turns": 1, "bad_record": 1},
}


NUMBERS = "zero one two three four five six seven eight nine ten".split()


def write_counting_alpaca(path: str, n: int = 64) -> str:
    """Learnable instructions: 'what comes after <number>?' -> the next number word."""
    records = []
    for i in range(n):
        k = i % 10
        records.append({"instruction": f"what number comes after {NUMBERS[k]}?", "input": "",
                        "output": f"the number after {NUMBERS[k]} is {NUMBERS[k + 1]}."})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # README: data/ of a fresh clone
    with open(path, "w") as f:
        json.dump(records, f)
    return path
