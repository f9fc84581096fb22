"""Progress of preprocessing (data/preprocess.py): a tqdm bar in documents (items/s) with
shards done as a postfix, fed by a Ticker in each shard's process; workers send their counts
through a queue that the driver drains.
"""

from __future__ import annotations

import os
import time

PROGRESS_EVERY_DOCS = 64  # a worker reports its document count this often ...
PROGRESS_EVERY_S = 0.5  # ... or after this long, whichever comes first


class Ticker:
    """Counts documents and hands them to `report(n)` every PROGRESS_EVERY_DOCS documents or
    PROGRESS_EVERY_S seconds, so the bar moves per document at the cost of one queue put per
    batch of documents, not one per document."""

    def __init__(self, report):
        self.report, self.pending, self.last = report, 0, time.monotonic()

    def tick(self) -> None:
        self.pending += 1
        if self.report is not None and (self.pending >= PROGRESS_EVERY_DOCS
                                        or time.monotonic() - self.last >= PROGRESS_EVERY_S):
            self.flush()

    def flush(self) -> None:
        if self.report is not None and self.pending:
            self.report(self.pending)
        self.pending, self.last = 0, time.monotonic()


def drain(counts, bar) -> None:
    while counts is not None and not counts.empty():
        bar.documents(counts.get())


class Bar:
    """tqdm in documents (items/s) with shards done as a postfix."""

    def __init__(self, total_docs: int | None, done_docs: int, total_shards: int, done_shards: int, name: str):
        from tqdm import tqdm

        self.shards, self.total_shards = done_shards, total_shards
        self.tqdm = tqdm(total=total_docs, initial=done_docs, desc=os.path.basename(name), unit="doc",
                         dynamic_ncols=True, smoothing=0.1)
        self.tqdm.set_postfix_str(f"shards {done_shards}/{total_shards}", refresh=False)

    def documents(self, n: int) -> None:
        self.tqdm.update(n)

    def shard_done(self) -> None:
        self.shards += 1
        self.tqdm.set_postfix_str(f"shards {self.shards}/{self.total_shards}")

    def close(self) -> None:
        self.tqdm.close()


def progress_bar(enabled: bool, shards: list, resumed: dict, name: str) -> Bar | None:
    if not enabled:
        return None
    # Synthetic shards know their size; file shards do not (the bar then shows count and rate).
    sizes = [s.spec[3] - s.spec[2] if s.source == "synthetic" else None for s in shards]
    total = None if None in sizes else sum(sizes)
    return Bar(total, sum(r["documents_in"] for r in resumed.values()), len(shards), len(resumed), name)


def shard_done(bar) -> None:
    if bar is not None:
        bar.shard_done()
