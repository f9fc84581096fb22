"""Chunk and window plans of interleaved documents, vectorised over the .idx arrays.

Both take one block of documents: `lengths` and `modes` of its items and `doc_index`, the
block's document boundaries as absolute item numbers (len = documents + 1); the rows they
return hold absolute item numbers, so blocks concatenate.

Chunks (samples.InterleavedView). Lay a document out as a line of payload units: a text
token is 1 unit, an image `tokens_per_image` units, and a chunk holds cap = seq_length - 2
units (BOS and EOS take the rest) and at most max_images images. Filling greedily, a chunk
starting at unit p ends at
    x = p + cap                     (text fills it; a text item continues in the next chunk)
unless an image straddles x (it does not fit, so the chunk ends at its start), or an
(max_images + 1)-th image starts before that (the chunk ends at its start), or the
document ends first. The next chunk starts where this one ended. So all chunks follow from
a few searchsorted calls per step, for every document at once. Between images, a run of
full text chunks p, p + cap, p + 2 cap, ... is emitted in one go, so the steps per document
are bounded by its images (about 2 per image at most), not by its items or tokens.
Chunk boundaries in units then map back to (item, token offset) with searchsorted on the
cumulative units.
"""

from __future__ import annotations

import numpy as np

from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT

_NEVER = np.iinfo(np.int64).max // 2  # sentinel image position past every document


def ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0), [0..c1), ... concatenated."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def chunk_plan(lengths: np.ndarray, modes: np.ndarray, doc_index: np.ndarray, seq_length: int,
               tokens_per_image: int, max_images: int) -> np.ndarray:
    """(num_chunks, 4) int64 rows (first_item, first_offset, last_item, last_stop), in order;
    the same rows as the reference loop in tests/test_data_plans.py."""
    cap, tpi = seq_length - 2, tokens_per_image
    is_image = modes == MODE_IMAGE
    size = np.where(is_image, np.int32(tpi), lengths.astype(np.int32, copy=False))  # units per item
    end = np.cumsum(size, dtype=np.int64)  # item i covers units [end[i] - size[i], end[i])
    local = np.asarray(doc_index, dtype=np.int64) - int(doc_index[0])
    edge = np.where(local > 0, end[np.maximum(local - 1, 0)], 0)  # (docs + 1,) unit where each document starts
    images = np.flatnonzero(is_image)
    img_end = np.append(end[images], _NEVER)  # (images + 1,)
    img_start = img_end - tpi
    doc_images = np.searchsorted(images, local)  # (docs + 1,) image numbers per document

    doc = np.flatnonzero(edge[1:] > edge[:-1])  # documents with something to lay out
    p, stop, img_hi = edge[doc], edge[doc + 1], doc_images[doc + 1]
    starts, ends, stops = [], [], []
    while len(p):
        nxt = np.searchsorted(img_start, p)  # first image at or after p
        barrier = np.where(nxt < img_hi, img_start[nxt], stop)
        full = (barrier - p) // cap  # whole text chunks before the next image
        run = np.repeat(p, full) + cap * ragged_arange(full)
        starts += [run]
        ends += [run + cap]
        stops += [np.repeat(stop, full)]
        p = p + full * cap
        live = p < stop
        p, stop, img_hi, nxt = p[live], stop[live], img_hi[live], nxt[live]
        # One chunk that meets an image (or the document's end).
        x = p + cap
        j = np.searchsorted(img_end, x, side="right")  # first image not ending by x
        e = np.where((j < img_hi) & (img_start[j] < x), img_start[j], x)
        k = np.minimum(nxt + max_images, len(images))  # the (max_images + 1)-th image from p
        e = np.minimum(np.where((k < img_hi) & (img_start[k] < e), img_start[k], e), stop)
        starts += [p]
        ends += [e]
        stops += [stop]
        p = e
        live = p < stop
        p, stop, img_hi = p[live], stop[live], img_hi[live]
    if not starts:
        return np.zeros((0, 4), dtype=np.int64)
    starts, ends, stops = (np.concatenate(a) for a in (starts, ends, stops))
    order = np.argsort(starts, kind="stable")
    return _to_items(starts[order], ends[order], stops[order], size, end, is_image, cap) + \
        np.array([doc_index[0], 0, doc_index[0], 0], dtype=np.int64)


def _to_items(starts, ends, stops, size, end, is_image, cap) -> np.ndarray:
    """Unit ranges [starts, ends) -> (first_item, first_offset, last_item, last_stop), block-local."""
    first = np.searchsorted(end, starts, side="right")  # the item holding unit `starts`
    last = np.searchsorted(end, ends - 1, side="right")  # the item holding the chunk's last unit
    last_stop = np.where(is_image[last], 0, ends - (end[last] - size[last]))
    # A chunk filled exactly by an image closes only when the next (non-empty) item arrives;
    # if that is text, the chunk records it with zero tokens taken (as the layout loop does).
    full = np.flatnonzero(is_image[last] & (ends - starts == cap) & (ends < stops))
    after = np.searchsorted(end, ends[full], side="right")  # the next non-empty item
    on_text = full[~is_image[after]]
    last[on_text], last_stop[on_text] = after[~is_image[after]], 0
    return np.stack([first, starts - (end[first] - size[first]), last, last_stop], axis=1)


def pair_window_plan(modes: np.ndarray, doc_index: np.ndarray, pairs_per_window: int) -> np.ndarray:
    """(num_windows, pairs_per_window) int64: the image item of each pair (an image followed
    by a text item of the same document), pairs_per_window consecutive pairs of a document
    per window; a document's last window is padded with -1."""
    base = int(doc_index[0])
    local = np.asarray(doc_index, dtype=np.int64) - base
    opens_doc = np.zeros(len(modes) + 1, dtype=bool)
    opens_doc[local] = True
    pairs = np.flatnonzero((modes[:-1] == MODE_IMAGE) & (modes[1:] == MODE_TEXT) & ~opens_doc[1:-1])
    doc = np.searchsorted(local, pairs, side="right") - 1
    first_of_doc = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]]) if len(pairs) else np.zeros(0, np.int64)
    rank = np.arange(len(pairs)) - np.repeat(first_of_doc, np.diff(np.r_[first_of_doc, len(pairs)]))
    window = np.cumsum(rank % pairs_per_window == 0) - 1
    out = np.full((int(window[-1]) + 1 if len(pairs) else 0, pairs_per_window), -1, dtype=np.int64)
    out[window, rank % pairs_per_window] = pairs + base
    return out
