"""Full verification of preprocessed datasets (tools/validate_data.py).

Opening a dataset for training checks only what is cheap (sizes, the .idx checksum, the
index structure). This reads everything: the .bin checksum, then every document in
parallel: token ids against the tokenizer's vocabulary, every image decoded at its size,
and the layout each kind promises (a pair is one caption and one image, a video 8 frames).
Every bad document is reported as (prefix, document, sequence, problem).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np

from megatron_emu.data.checksums import file_xxh3
from megatron_emu.data.indexed import MODE_IMAGE, MultimodalIndexed, _check_files, read_meta

DOCS_PER_TASK = 256
FRAMES_PER_VIDEO = 8


@dataclass(frozen=True)
class Problem:
    """A bad document (document and sequence given) or a bad file (the problem names it)."""

    prefix: str
    problem: str
    document: int | None = None
    sequence: int | None = None

    def line(self) -> str:
        if self.document is None:
            return self.problem
        return f"{self.prefix}: document {self.document}, sequence {self.sequence}: {self.problem}"


def validate_dataset(prefix: str, text_vocab_size: int, tokenizer_fingerprint: str, *, workers: int = 1,
                     progress: bool = True) -> tuple[list[Problem], dict]:
    """(problems, counts) for one dataset; text ids must lie in [0, text_vocab_size)."""
    try:
        meta = read_meta(prefix)
        _check_files(prefix, meta)
    except (ValueError, KeyError) as e:
        return [Problem(prefix, str(e))], {}
    if meta["tokenizer"] != tokenizer_fingerprint:
        return [Problem(prefix, f"{prefix}.json: written with tokenizer {meta['tokenizer']}, not the given one "
                                f"({tokenizer_fingerprint})")], {}
    problems = _checksum_problems(prefix, meta, progress)
    if any(p.problem.startswith(prefix + ".idx") for p in problems):
        return problems, {}  # another dataset's index: its documents would be nonsense
    try:
        data = MultimodalIndexed(prefix)
    except ValueError as e:
        return problems + [Problem(prefix, str(e))], {}
    bad = _document_problems(data, text_vocab_size, workers, progress)
    if any(p.problem.startswith(prefix + ".bin") for p in problems) and not bad:
        problems.append(Problem(prefix, f"{prefix}.bin: no document shows the change: the changed bytes are valid "
                                        "pixel or token values"))
    counts = {"documents": len(data), "sequences": len(data.lengths),
              "images": int(np.count_nonzero(data.modes == MODE_IMAGE))}
    return problems + bad, counts


def _checksum_problems(prefix: str, meta: dict, progress: bool) -> list[Problem]:
    if "idx_xxh3" not in meta:
        return [Problem(prefix, f"{prefix}.json: records no checksums (written before they existed): .bin and "
                                ".idx unverifiable; preprocess again to add them")]
    problems = []
    for ext in (".idx", ".bin"):
        actual = file_xxh3(prefix + ext, _bytes_bar(prefix + ext, progress))
        if actual != meta[ext[1:] + "_xxh3"]:
            problems.append(Problem(prefix, f"{prefix}{ext}: checksum xxh3_64 {actual} differs from the recorded "
                                            f"{meta[ext[1:] + '_xxh3']} (corrupted, or another dataset's file)"))
    return problems


def _bytes_bar(path: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"checksum {os.path.basename(path)}",
               leave=False, dynamic_ncols=True)
    return bar.update


# --- per-document checks (run in worker processes) ---------------------------------------
_DATA: dict = {}  # set before the pool forks: the workers inherit the open dataset


def _check_documents(task: tuple[int, int]) -> list[Problem]:
    start, stop = task
    data, vocab = _DATA["data"], _DATA["vocab"]
    problems = []
    for doc in range(start, stop):
        problems.extend(check_document(data, doc, vocab))
    return problems


def check_document(data: MultimodalIndexed, doc: int, text_vocab_size: int) -> list[Problem]:
    problems, images, texts = [], 0, 0
    items = data.item_range(doc)
    for item in items:
        if int(data.modes[item]) == MODE_IMAGE:
            images += 1
            try:
                data.read_image(item)
            except ValueError as e:
                problems.append(Problem(data.prefix, _reason(e), doc, item))
            continue
        texts += 1
        ids = data.ds.get(item)[0]
        outside = np.flatnonzero((ids < 0) | (ids >= text_vocab_size))
        if len(outside):
            problems.append(Problem(data.prefix, f"token id {int(ids[outside[0]])} at position {int(outside[0])} "
                                                 f"is outside the vocabulary of {text_vocab_size} "
                                                 f"({len(outside)} such ids)", doc, item))
    layout = _layout_problem(data.kind, images, texts)
    if layout:
        problems.append(Problem(data.prefix, layout, doc, items.start))
    return problems


def _reason(e: ValueError) -> str:
    """bad_item's message without the 'prefix: document d, sequence s: ' it starts with."""
    return str(e).split(": ", 2)[-1]


def _layout_problem(kind: str, images: int, texts: int) -> str:
    if kind == "pairs" and (images, texts) != (1, 1):
        return f"a pair holds {images} images and {texts} texts, not one of each"
    if kind == "video" and images != FRAMES_PER_VIDEO:
        return f"a video holds {images} frames, not {FRAMES_PER_VIDEO}"
    if images + texts == 0:
        return "empty document"
    return ""


def _document_problems(data: MultimodalIndexed, vocab: int, workers: int, progress: bool) -> list[Problem]:
    tasks = [(s, min(s + DOCS_PER_TASK, len(data))) for s in range(0, len(data), DOCS_PER_TASK)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), unit="doc", desc=os.path.basename(data.prefix), dynamic_ncols=True)
    _DATA.update(data=data, vocab=vocab)
    problems = []
    try:
        if workers > 1 and len(tasks) > 1:
            with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
                for task, found in zip(tasks, pool.imap(_check_documents, tasks)):
                    problems.extend(found)
                    _advance(bar, task)
        else:
            for task in tasks:
                problems.extend(_check_documents(task))
                _advance(bar, task)
    finally:
        _DATA.clear()
        if bar is not None:
            bar.close()
    return problems


def _advance(bar, task: tuple[int, int]) -> None:
    if bar is not None:
        bar.update(task[1] - task[0])
