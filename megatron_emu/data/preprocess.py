"""Raw documents -> megatron-core .bin/.idx, sharded over worker processes.

The one code path behind tools/preprocess_data.py and the bundled synthetic corpus:
shards are processed independently into partial datasets (`<out>.parts/NNNNN.*`),
which are then merged in shard order, so the output does not depend on --workers and
an interrupted run resumes by skipping the shards whose partial files are complete.
The same parts make multi-node preprocessing: job i of n writes the parts of shards
i, i+n, ... and merge_parts joins everyone's afterwards, byte for byte one job's output.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from megatron_emu.data.images import SkipItem, prepare_image, stored_image  # noqa: F401 (prepare_image: API)
from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, DocumentWriter, _check_files, read_meta
from megatron_emu.data.preprocess_progress import Ticker, drain, shard_done
from megatron_emu.data.preprocess_progress import progress_bar as _progress_bar  # tests stand a recorder in
from megatron_emu.data.synthetic import RawDocument

MAX_NAMED_SKIPS = 10000  # the report names every skipped input, up to this many


@dataclass
class Shard:
    """A unit of work. source: 'synthetic' (spec = (kind, seed, start, stop)) or an input type."""

    index: int
    source: str
    spec: object
    name: str


def encode_document(doc: RawDocument, tokenizer, image_size: int, skips: Counter, named: list,
                    image_format: str = "raw") -> list | None:
    """RawDocument -> [(mode, ids or stored image)], skipping (and counting) unusable items.

    Returns None when the document itself is unusable (a pair without image or caption,
    a video without 8 frames, or nothing left at all).
    """
    if doc.kind == "conversation":  # instruction tuning: the Emu-I template (data/instruct.py)
        return encode_conversation(doc, tokenizer, image_size, skips, named, image_format)
    items = []
    for k, (kind, value) in enumerate(doc.items):
        try:
            if kind == "text":
                text = str(value).strip()
                if not text:
                    raise SkipItem("empty_text", f"{doc.name}#{k}")
                items.append((MODE_TEXT, np.asarray(tokenizer.encode(text), dtype=np.int64)))
            else:
                items.append((MODE_IMAGE, stored_image(value, image_size, image_format, name=f"{doc.name}#{k}")))
        except SkipItem as s:
            _count(skips, named, s.reason, s.name)
    n_img = sum(m == MODE_IMAGE for m, _ in items)
    n_txt = len(items) - n_img
    if doc.kind == "pairs" and (n_img != 1 or n_txt != 1):
        _count(skips, named, "incomplete_pair", doc.name)
        return None
    if doc.kind == "video" and n_img != 8:
        _count(skips, named, "too_few_frames", doc.name)
        return None
    if not items:
        _count(skips, named, "empty_document", doc.name)
        return None
    return items


def _count(skips: Counter, named: list, reason: str, name: str) -> None:
    skips[reason] += 1
    if len(named) < MAX_NAMED_SKIPS:
        named.append({"reason": reason, "name": name})


def encode_conversation(doc: RawDocument, tokenizer, image_size: int, skips, named,
                        image_format: str = "raw") -> list | None:
    """A conversation RawDocument -> stored items (data/instruct.py); None (counted) if unusable.
    A conversation whose image is unreadable is dropped whole: its answers talk about it."""
    from megatron_emu.data.instruct import render_conversation  # torch: only for conversations

    system = doc.items[0][1]
    visuals, turns = [], []
    try:
        for k, (kind, value) in enumerate(doc.items[1:], 1):
            if kind == "image":
                visuals.append(stored_image(value, image_size, image_format, name=f"{doc.name}#{k}"))
            elif kind == "user":
                turns.append([value, None])
            else:
                turns[-1][1] = value
    except SkipItem as s:
        _count(skips, named, s.reason, s.name)
        return None
    return render_conversation(tokenizer, system, visuals, [tuple(t) for t in turns])


# --- per-shard work (runs in worker processes) -----------------------------------------
_WORKER_TOKENIZER = {}


def _tokenizer(path: str, num_special: int):
    from megatron_emu.data.tokenizer import EmuTokenizer

    key = (path, num_special)
    if key not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[key] = EmuTokenizer(path, num_special)
    return _WORKER_TOKENIZER[key]


def iter_shard_documents(shard: Shard):
    """Yields RawDocument or SkipItem (a source-level failure: unreadable line, shard...)."""
    if shard.source == "synthetic":
        from megatron_emu.data.synthetic import MAKERS

        kind, seed, start, stop = shard.spec
        for i in range(start, stop):
            yield MAKERS[kind](seed, i)
    else:
        from megatron_emu.data.sources import iter_source

        yield from iter_source(shard.source, shard.spec)


def documents_of(shard: Shard):
    """The shard's documents (and SkipItems); a source that dies mid-way ends them with an
    unreadable_shard SkipItem naming the shard: what was read is kept. Only the reading is
    guarded: an error while the caller writes a document is not raised in here."""
    try:
        yield from iter_shard_documents(shard)
    except Exception as e:
        yield SkipItem("unreadable_shard", f"{shard.name} ({e.__class__.__name__}: {e})")


def process_shard(job: tuple, progress=None) -> dict:
    """Write one shard's partial dataset; its .json (written last) marks it complete.

    progress: None or a callable(number of documents read since the last call)."""
    shard, part_prefix, kind, tok_path, num_special, image_size, image_format = job
    tokenizer = _tokenizer(tok_path, num_special)
    skips, named = Counter(), []
    docs_in = docs_out = 0
    ticker = Ticker(progress)
    if os.path.exists(part_prefix + ".json"):  # a stale marker must not vouch for the files rewritten below
        os.remove(part_prefix + ".json")
    writer = DocumentWriter(part_prefix, tokenizer.vocab_size, image_size, image_format)
    for doc in documents_of(shard):
        if isinstance(doc, SkipItem):
            _count(skips, named, doc.reason, doc.name)
            if doc.reason != "unreadable_shard":
                docs_in += 1
                ticker.tick()
            continue
        docs_in += 1
        ticker.tick()
        items = encode_document(doc, tokenizer, image_size, skips, named, image_format)
        if items is not None:
            writer.add_document(items)  # a write error (a full disk) stops the job: not the input's fault
            docs_out += 1
    ticker.flush()
    report = {"documents_in": docs_in, "documents_out": docs_out, "images_kept": writer.num_images,
              "skipped": dict(skips), "skipped_items": named}
    writer.finalize({"kind": kind, "image_size": image_size, "tokenizer": tokenizer.fingerprint,
                     "vocab_size": tokenizer.vocab_size, "shard": shard.name, "report": report})
    return report


_PROGRESS_QUEUE = None  # set in each pool worker: document counts go to the parent's bar


def _init_worker(queue) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue


def _process_shard_in_worker(job: tuple) -> dict:
    return process_shard(job, _PROGRESS_QUEUE.put if _PROGRESS_QUEUE is not None else None)


def _part_prefix(parts_dir: str, shard: Shard) -> str:
    return os.path.join(parts_dir, f"{shard.index:05d}")


def _part_done(part_prefix: str, expected: dict) -> dict | None:
    """A complete part written with the same settings (`expected` meta fields): its meta."""
    try:
        meta = read_meta(part_prefix)
        _check_files(part_prefix, meta)
        if any(meta.get(k, "raw" if k == "image_format" else None) != v for k, v in expected.items()):
            return None
        return meta if "report" in meta else None
    except (ValueError, KeyError):
        return None


def assigned_shards(shards: list[Shard], shard_index: int, num_shards: int) -> list[Shard]:
    """Job shard_index of num_shards takes input shards shard_index, shard_index + n, ...:
    deterministic in the (sorted) input list, and balanced when inputs are alike."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} is outside [0, --num-shards {num_shards})")
    return shards[shard_index::num_shards]


# --- driver ------------------------------------------------------------------------------
def preprocess(shards: list[Shard], output_prefix: str, kind: str, tokenizer_path: str, *,
               num_special: int = 4, image_size: int = 224, image_format: str = "raw", workers: int = 1,
               resume: bool = False, progress: bool = True, keep_parts: bool = False,
               shard_index: int = 0, num_shards: int = 1) -> dict:
    """Process `shards` into `<output_prefix>.bin/.idx/.json`; returns the JSON report.

    With num_shards > 1 (multi-node), this job writes only the parts of its shards
    (assigned_shards) and merges nothing: merge_parts (--merge) joins all jobs' parts once
    every job is done, byte for byte what one job over all shards writes."""
    t0 = time.time()
    check_outputs_spare_inputs(shards, output_prefix)
    parts_dir = output_prefix + ".parts"
    os.makedirs(parts_dir, exist_ok=True)
    mine = assigned_shards(shards, shard_index, num_shards)
    settings = _part_settings(kind, tokenizer_path, num_special, image_size, image_format)
    reports, jobs = {}, []
    for shard in mine:
        part = _part_prefix(parts_dir, shard)
        done = _part_done(part, dict(settings, shard=shard.name)) if resume else None
        if done is not None:
            reports[shard.index] = done["report"]
        else:
            jobs.append((shard, part, kind, tokenizer_path, num_special, image_size, image_format))
    resumed = len(reports)
    bar = _progress_bar(progress, mine, reports, output_prefix)
    try:
        if workers > 1 and len(jobs) > 1:
            _run_pool(jobs, min(workers, len(jobs)), reports, bar)
        else:
            for job in jobs:
                reports[job[0].index] = process_shard(job, bar.documents if bar else None)
                shard_done(bar)
    finally:  # also on an error: the bar's line ends before the error's
        if bar is not None:
            bar.close()
    if num_shards > 1:
        return dict(_summary(reports.values(), time.time() - t0), output_prefix=output_prefix, kind=kind,
                    shards=len(mine), shards_resumed=resumed, job=f"{shard_index} of {num_shards}")
    return merge_parts(shards, output_prefix, kind, tokenizer_path, num_special=num_special,
                       image_size=image_size, image_format=image_format, keep_parts=keep_parts,
                       resumed=resumed, started=t0)


def _part_settings(kind, tokenizer_path, num_special, image_size, image_format) -> dict:
    tokenizer = _tokenizer(tokenizer_path, num_special)
    return {"kind": kind, "image_size": image_size, "image_format": image_format,
            "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}


OUTPUT_SUFFIXES = (".bin", ".idx", ".json", ".report.json")


def check_outputs_spare_inputs(shards: list[Shard], output_prefix: str) -> None:
    """An output that is also an input (`--input data/x.json --output-prefix data/x`) would be
    overwritten by the dataset's metadata: refused before anything is written."""
    outputs = {os.path.realpath(output_prefix + suffix): output_prefix + suffix for suffix in OUTPUT_SUFFIXES}
    for shard in shards:
        if isinstance(shard.spec, str) and os.path.realpath(shard.spec) in outputs:
            raise ValueError(f"{shard.spec}: is an input, and --output-prefix {output_prefix} would overwrite it "
                             f"with {outputs[os.path.realpath(shard.spec)]}; choose another --output-prefix")


def merge_parts(shards: list[Shard], output_prefix: str, kind: str, tokenizer_path: str, *,
                num_special: int = 4, image_size: int = 224, image_format: str = "raw",
                keep_parts: bool = False, resumed: int = 0, started: float | None = None) -> dict:
    """Concatenate every shard's part, in shard order, into `<output_prefix>.*` without
    decoding anything (.idx entries appended, .bin bytes copied and hashed on the way)."""
    t0 = time.time() if started is None else started
    check_outputs_spare_inputs(shards, output_prefix)
    parts_dir = output_prefix + ".parts"
    settings = _part_settings(kind, tokenizer_path, num_special, image_size, image_format)
    metas = {s.index: _part_done(_part_prefix(parts_dir, s), dict(settings, shard=s.name)) for s in shards}
    missing = [s for s in shards if metas[s.index] is None]
    if missing:
        raise ValueError(f"{parts_dir}: {len(missing)} of {len(shards)} parts missing, incomplete or written with "
                         f"other settings, first {missing[0].name} (part {missing[0].index:05d}); run its job "
                         "again (with --resume) before --merge")
    writer = DocumentWriter(output_prefix, settings["vocab_size"], image_size, image_format)
    for shard in shards:
        writer.add_index(_part_prefix(parts_dir, shard), metas[shard.index].get("bin_xxh3"))
    report = dict(output_prefix=output_prefix, kind=kind, shards=len(shards), shards_resumed=resumed,
                  **_summary([m["report"] for m in metas.values()], time.time() - t0))
    writer.finalize({"kind": kind, "image_size": image_size, "tokenizer": settings["tokenizer"],
                     "vocab_size": settings["vocab_size"], "num_documents": report["documents_out"],
                     "num_images": report["images_kept"]})
    with open(output_prefix + ".report.json", "w") as f:
        json.dump(report, f, indent=1)
    if not keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return report


def _summary(reports, elapsed: float) -> dict:
    reports = list(reports)
    total, named = Counter(), []
    for r in reports:
        total.update(r["skipped"])
        named.extend(r["skipped_items"])
    docs_in = sum(r["documents_in"] for r in reports)
    return {"documents_in": docs_in, "documents_out": sum(r["documents_out"] for r in reports),
            "images_kept": sum(r["images_kept"] for r in reports), "skipped": dict(total),
            "skipped_items": named[:MAX_NAMED_SKIPS], "elapsed_s": round(elapsed, 3),
            "documents_per_s": round(docs_in / max(elapsed, 1e-9), 1)}


def _run_pool(jobs: list, workers: int, reports: dict, bar) -> None:
    """Shards in worker processes; their per-document counts arrive through a queue."""
    from megatron_emu.data.indexed import _mcore

    _mcore()  # import megatron-core once here, not once per forked worker
    ctx = mp.get_context("fork")
    # SimpleQueue: put() writes to the pipe before the worker returns its result, so once
    # every result is in, every count is too (mp.Queue's feeder thread could lag).
    counts = ctx.SimpleQueue() if bar is not None else None
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counts,)) as pool:
        pending = {job[0].index: pool.apply_async(_process_shard_in_worker, (job,)) for job in jobs}
        while pending:
            drain(counts, bar)
            done = [i for i, r in pending.items() if r.ready()]
            for index in done:
                reports[index] = pending.pop(index).get()  # re-raises a worker's error
                shard_done(bar)
            if pending and not done:
                next(iter(pending.values())).wait(0.1)
        drain(counts, bar)


def synthetic_shards(kind: str, num_documents: int, seed: int, docs_per_shard: int = 250) -> list[Shard]:
    return [Shard(i, "synthetic", (kind, seed, start, min(start + docs_per_shard, num_documents)),
                  f"synthetic-{kind}[{start}:{min(start + docs_per_shard, num_documents)}]")
            for i, start in enumerate(range(0, num_documents, docs_per_shard))]
