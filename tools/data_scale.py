"""Start-up and memory of the loader against dataset size (`benchmark_data.py --scale`).

Fake datasets, cheap at any size:
- the .idx is a real megatron-core index (idx_file.py's layout, byte-identical to what
  IndexedDatasetBuilder writes), generated section by section with vectorised numpy in
  blocks, so writing one costs a few seconds per 10^7 items and little memory;
- the .bin is a sparse file of the size the index describes (os.truncate): it occupies no
  disk and reads as zeros (black images, token 0);
- the .json is the usual dataset description (tokenizer fingerprint, sizes, the .idx's
  checksum, which the loader verifies at open; the sparse .bin's checksum is not computed).
Pairs: [caption of 8..47 tokens, image]; interleaved: 8 items per document
[T, I, T, T, I, T, I, T] with text items of 5..101 tokens. Images are 32x32 so that
10^8 documents stay below the file system's maximum file size (the index, the plans and
the loader's work do not depend on the image size).

Each measurement is a fresh Python process (python -c, importing torch and megatron-core as
training does) that builds the loader and takes one micro-batch; it reports the wall time
from its start and its peak RSS (VmHWM of /proc/self/status: ru_maxrss would also count the
parent's pages, which Linux carries over a fork + exec), and its anonymous and file-backed
resident memory at the end. Cold: no plan cache yet (the process builds it); warm: the
cache exists.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_emu.data.idx_file import DTYPE_CODES, HEADER  # noqa: E402

IMAGE_SIZE = 32
INTERLEAVED = np.array([0, 1, 0, 0, 1, 0, 1, 0], dtype=np.int8)  # modes of one document's items
BLOCK = 1 << 22  # items generated at a time


def _items(kind: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int32, modes int8) of items [lo, hi) of a fake dataset."""
    i = np.arange(lo, hi, dtype=np.int64)
    image_len = 3 * IMAGE_SIZE * IMAGE_SIZE // 2  # uint16 items
    if kind == "pairs":
        modes = (i % 2).astype(np.int8)
        text = 8 + (i * 2654435761 >> 7) % 40
    else:
        modes = INTERLEAVED[i % len(INTERLEAVED)]
        text = 5 + (i * 2654435761 >> 7) % 97
    return np.where(modes == 1, image_len, text).astype(np.int32), modes


def make_fake(prefix: str, kind: str, num_docs: int, tokenizer) -> None:
    per_doc = 2 if kind == "pairs" else len(INTERLEAVED)
    items = num_docs * per_doc
    with open(prefix + ".idx", "wb") as f:
        f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[np.uint16]))
        f.write(struct.pack("<QQ", items, num_docs + 1))
        for lo in range(0, items, BLOCK):
            _items(kind, lo, min(lo + BLOCK, items))[0].tofile(f)
        pointer = 0
        for lo in range(0, items, BLOCK):
            lengths = _items(kind, lo, min(lo + BLOCK, items))[0].astype(np.int64) * 2
            ends = pointer + np.cumsum(lengths)
            (ends - lengths).tofile(f)
            pointer = int(ends[-1])
        for lo in range(0, num_docs + 1, BLOCK):
            (np.arange(lo, min(lo + BLOCK, num_docs + 1), dtype=np.int64) * per_doc).tofile(f)
        for lo in range(0, items, BLOCK):
            _items(kind, lo, min(lo + BLOCK, items))[1].tofile(f)
    with open(prefix + ".bin", "wb") as f:
        f.truncate(pointer)  # sparse
    from megatron_emu.data.indexed import write_meta

    # The .idx checksum is real (the loader verifies it at open, and that is part of what is
    # measured); the sparse .bin's is not computed: hashing terabytes of holes measures nothing.
    write_meta(prefix, {"kind": kind, "image_size": IMAGE_SIZE, "tokenizer": tokenizer.fingerprint,
                        "vocab_size": tokenizer.vocab_size, "num_documents": num_docs, "fake": True},
               bin_xxh3="not computed (sparse fake .bin)")


CHILD = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import torch
from megatron.core.datasets import indexed_dataset  # what the reader imports; seconds, whatever the size
from megatron_emu.config import DataConfig
from megatron_emu.data.loader import build_pretrain_loader
from megatron_emu.data.tokenizer import EmuTokenizer
torch.set_num_threads(1)
t_import = time.perf_counter() - t0
tok = EmuTokenizer({model!r})
cfg = DataConfig(data_path=[{path!r}], seq_length=1024, micro_batch_size=8, global_batch_size=8, num_workers=0)
batch = next(build_pretrain_loader(cfg, tok, dp_rank=0, dp_size=1, seed=0))
assert batch["tokens"].shape == (8, 1024)
t = time.perf_counter() - t0
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kb = lambda key: int(status.get(key, "0 kB").split()[0]) / 1024
print(json.dumps({{"first_batch_s": t, "import_s": t_import, "startup_s": t - t_import,
                  "rss_anon_mb": kb("RssAnon"), "rss_file_mb": kb("RssFile"), "peak_rss_mb": kb("VmHWM")}}))
"""


def _fresh_process(path: str, model: str) -> dict:
    code = CHILD.format(root=ROOT, model=model, path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"scale benchmark child failed for {path}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _remove_plans(prefix: str) -> None:
    folder, name = os.path.split(prefix)
    for f in os.listdir(folder):
        if f.startswith(name + ".plan-") or f.startswith(name + ".idx-verified"):  # plans and checksum stamps
            os.remove(os.path.join(folder, f))


def run_scale(sizes: dict[str, list[int]], workdir: str, tokenizer) -> list[dict]:
    """One row per (view, size): fake creation time, cold and warm start-up and peak RSS."""
    rows = []
    for kind, counts in sizes.items():
        for n in counts:
            prefix = os.path.join(workdir, f"fake-{kind}-{n}")
            t0 = time.perf_counter()
            make_fake(prefix, kind, n, tokenizer)
            made = time.perf_counter() - t0
            views = [prefix] if kind == "pairs" else [prefix, prefix + ":pairs"]
            for path in views:
                _remove_plans(prefix)
                cold, warm = _fresh_process(path, tokenizer.model_path), _fresh_process(path, tokenizer.model_path)
                rows.append({"view": "pairs" if kind == "pairs" else ("5-pair windows" if path != prefix
                                                                       else "interleaved chunks"),
                             "documents": n, "idx_gb": round(os.path.getsize(prefix + ".idx") / 1e9, 3),
                             "make_fake_s": round(made, 1), "cold": _rounded(cold), "warm": _rounded(warm),
                             "plan_docs_per_s": _plan_speed(prefix, path != prefix) if kind != "pairs" else None})
                print(json.dumps(rows[-1]), flush=True)
            for f in os.listdir(workdir):
                if f.startswith(f"fake-{kind}-{n}."):
                    os.remove(os.path.join(workdir, f))
    return rows


def _rounded(r: dict) -> dict:
    return {k: round(v, 2) for k, v in r.items()}


def _plan_speed(prefix: str, windows: bool) -> int:
    """Documents per second of a plan build (reading the .idx in blocks + planning), in this process."""
    from functools import partial

    from megatron_emu.data.idx_file import IdxFile
    from megatron_emu.data.plan_cache import DOCS_PER_BLOCK
    from megatron_emu.data.plans import chunk_plan, pair_window_plan

    idx = IdxFile.open(prefix + ".idx")
    plan = partial(chunk_plan, seq_length=1024, tokens_per_image=34, max_images=5)
    t0 = time.perf_counter()
    for lo in range(0, idx.num_documents, DOCS_PER_BLOCK):
        lengths, modes, doc_index = idx.block(lo, min(lo + DOCS_PER_BLOCK, idx.num_documents))
        pair_window_plan(modes, doc_index, 5) if windows else plan(lengths, modes, doc_index)
    return round(idx.num_documents / (time.perf_counter() - t0))


def print_table(rows: list[dict]) -> None:
    """Start-up: from the end of the imports (torch, megatron-core: a fixed cost, listed apart)
    to the first micro-batch."""
    print(f"{'view':20s} {'documents':>11s} {'idx GB':>7s} {'cold s':>7s} {'warm s':>7s} {'peak RSS MB':>12s} "
          f"{'anon MB':>8s} {'file MB':>8s} {'imports s':>10s} {'build docs/s':>13s}")
    for r in rows:
        c, w = r["cold"], r["warm"]
        print(f"{r['view']:20s} {r['documents']:11,d} {r['idx_gb']:7.3f} {c['startup_s']:7.2f} {w['startup_s']:7.2f} "
              f"{max(c['peak_rss_mb'], w['peak_rss_mb']):12.0f} {max(c['rss_anon_mb'], w['rss_anon_mb']):8.0f} "
              f"{max(c['rss_file_mb'], w['rss_file_mb']):8.0f} {w['import_s']:10.2f} "
              f"{str(r['plan_docs_per_s'] or '-'):>13s}")


def check_disk(workdir: str, sizes: dict[str, list[int]]) -> None:
    """Refuse to start when the largest fake index and its plans would not fit."""
    need = max(n * (2 * 13 + 8 + 64) if kind == "pairs" else n * (8 * 13 + 8 + 80)
               for kind, counts in sizes.items() for n in counts)
    free = shutil.disk_usage(workdir).free
    if need > 0.8 * free:
        raise SystemExit(f"{workdir}: the largest fake dataset needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def bundled_plan_speed(tokenizer, cache_dir: str = "") -> dict:
    """plan_chunks on the bundled corpus' interleaved dataset: the previous release's loop
    (kept in tests/test_data_plans.py) against the vectorised plan, and the warm cache."""
    from megatron_emu.data.indexed import MultimodalIndexed
    from megatron_emu.data.loader import ensure_synthetic_corpus
    from megatron_emu.data.plans import chunk_plan
    from megatron_emu.data.samples import SeqSpec, plan_chunks
    from tests.test_data_plans import reference_chunks

    prefix = ensure_synthetic_corpus(cache_dir, tokenizer)[3]
    data = MultimodalIndexed(prefix)
    spec = SeqSpec.from_tokenizer(tokenizer, 1024)

    def best(fn, repeat):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    loop_s, ref = best(lambda: reference_chunks(data, 1024, spec.tokens_per_image, 5), 5)
    vec_s, vec = best(lambda: chunk_plan(data.lengths, data.modes, data.doc_index, 1024, spec.tokens_per_image, 5), 50)
    plan_chunks(data, spec, 5)  # make sure the cache exists
    warm_s, cached = best(lambda: np.asarray(plan_chunks(data, spec, 5)), 50)
    if not (np.array_equal(ref, vec) and np.array_equal(ref, cached)):
        raise RuntimeError(f"{prefix}: vectorised plan differs from the reference")
    n = len(data)
    out = {"documents": n, "chunks": len(ref), "loop_us_per_doc": round(loop_s / n * 1e6, 2),
           "vectorised_us_per_doc": round(vec_s / n * 1e6, 3), "warm_cache_us_per_doc": round(warm_s / n * 1e6, 3),
           "speedup_vectorised": round(loop_s / vec_s, 1), "speedup_warm_cache": round(loop_s / warm_s, 1)}
    # The same documents repeated 500 times: per-document cost once numpy's per-call overhead
    # (a few microseconds a call, which dominates 200 documents) is amortised.
    tiled = _Tiled(data, 500)
    loop_s, ref = best(lambda: reference_chunks(tiled, 1024, spec.tokens_per_image, 5), 2)
    vec_s, vec = best(lambda: np.concatenate(list(_in_blocks(tiled, spec.tokens_per_image))), 5)
    if not np.array_equal(ref, vec):
        raise RuntimeError(f"{prefix}: vectorised plan differs from the reference on the tiled corpus")
    out["tiled_x500"] = {"documents": len(tiled), "loop_us_per_doc": round(loop_s / len(tiled) * 1e6, 2),
                         "vectorised_us_per_doc": round(vec_s / len(tiled) * 1e6, 3),
                         "speedup_vectorised": round(loop_s / vec_s, 1)}
    return out


def _in_blocks(tiled, tokens_per_image):
    """chunk_plan over blocks of DOCS_PER_BLOCK documents, as a cache build runs it."""
    from megatron_emu.data.plan_cache import DOCS_PER_BLOCK
    from megatron_emu.data.plans import chunk_plan

    for lo in range(0, len(tiled), DOCS_PER_BLOCK):
        di = tiled.doc_index[lo:min(lo + DOCS_PER_BLOCK, len(tiled)) + 1]
        yield chunk_plan(tiled.lengths[di[0]:di[-1]], tiled.modes[di[0]:di[-1]], di, 1024, tokens_per_image, 5)


class _Tiled:
    """A dataset's index repeated `times` times (what the reference loop reads)."""

    def __init__(self, data, times: int):
        self.lengths, self.modes = np.tile(data.lengths, times), np.tile(data.modes, times)
        per_doc = np.tile(np.diff(data.doc_index), times)
        self.doc_index = np.concatenate(([0], np.cumsum(per_doc)))

    def __len__(self):
        return len(self.doc_index) - 1

    def item_range(self, doc):
        return range(int(self.doc_index[doc]), int(self.doc_index[doc + 1]))
