"""Sample builders: stored documents -> token sequences with images (spec sections 3, 5).

An image in the stream is [IMG] + <image> x num_query + [/IMG] (tokens_per_image in all)
and is never cut: an image that does not fit is dropped whole and counted. Interleaved
documents lose nothing: text that overflows a sequence continues in the next one. Where a
view has no next sequence (a pair's caption, a 5-pair window, a video), text is truncated
and the cut tokens are counted (`truncated_tokens` in each batch). Sequences start with
BOS and end with EOS when it fits.

Views (what one sample is):
- PairView:        a pair document; image before or after the caption at random (seeded);
- InterleavedView: a chunk of an interleaved document, up to seq_length tokens and at most
                   5 images (paper: MMC4 sequences up to 1024 tokens with <= 5 images);
                   a long text item is split over consecutive chunks;
- PairsWindowView: 5 consecutive (image, text) pairs of an interleaved document, up to
                   512 tokens (the paper's second MMC4 view);
- VideoView:       8 frames interleaved with subtitles by timestamp (stored in that order).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT, MultimodalIndexed
from megatron_emu.data.instruct import ConversationView, answer_mask_rows
from megatron_emu.data.plan_cache import MappedPlan, cached_plan
from megatron_emu.data.plans import chunk_plan, pair_window_plan
from megatron_emu.data.sequence import Sample, SeqSpec  # noqa: F401 (SeqSpec: API)

MAX_IMAGES_PER_CHUNK = 5
PAIRS_PER_WINDOW = 5
PAIRS_WINDOW_TOKENS = 512


def assemble(items, spec: SeqSpec, kind: str, max_images: int | None = None, seq_length: int | None = None) -> Sample:
    """Greedy left-to-right layout of (mode, array) items; text truncated (and counted),
    images all-or-nothing."""
    limit = seq_length or spec.seq_length
    tokens, images, dropped, truncated = [spec.bos_id], [], 0, 0
    for mode, value in items:
        room = limit - len(tokens)
        if mode == MODE_IMAGE:
            if spec.tokens_per_image <= room and (max_images is None or len(images) < max_images):
                tokens.extend(spec.image_tokens())
                images.append(value)
            else:
                dropped += 1
        else:
            kept = value[: max(room, 0)]
            tokens.extend(kept.tolist())
            truncated += len(value) - len(kept)
    if len(tokens) < limit:
        tokens.append(spec.eos_id)
    return Sample(tokens, images, kind, dropped, truncated)


class PairView:
    """One sample per pair document; the placement coin is seeded by the draw key."""

    kind = "pair"

    def __init__(self, data: MultimodalIndexed, spec: SeqSpec):
        self.data, self.spec = data, spec

    def __len__(self) -> int:
        return len(self.data)

    def build(self, index: int, key: tuple) -> Sample:
        items = self.data.read_document(index)
        text = [v for m, v in items if m == MODE_TEXT][0]
        image = [v for m, v in items if m == MODE_IMAGE][0]
        # Keep room for the image: the caption is what gets truncated.
        kept = text[: max(0, self.spec.seq_length - 1 - self.spec.tokens_per_image)]
        image_first = bool(np.random.default_rng(key).integers(2))
        ordered = [(MODE_IMAGE, image), (MODE_TEXT, kept)] if image_first else [(MODE_TEXT, kept), (MODE_IMAGE, image)]
        sample = assemble(ordered, self.spec, self.kind)
        sample.truncated_tokens += len(text) - len(kept)
        return sample


def plan_chunks(data: MultimodalIndexed, spec: SeqSpec, max_images: int, cache_dir: str = "") -> np.ndarray:
    """Interleaved documents -> chunks, computed from the .idx alone (plans.chunk_plan) and
    cached beside the dataset (plan_cache.py).

    Row (first_item, first_offset, last_item, last_stop): items first..last, the first one
    read from token first_offset, the last one up to token last_stop (images: offsets 0).
    A chunk holds whole images (at most max_images) and text up to seq_length tokens with
    BOS + EOS; text that does not fit continues in the next chunk, so no token is lost.
    (seq_length >= tokens_per_image + 2 is checked by the loader, so every image fits in
    an empty chunk.)
    """
    if max_images < 1:
        raise ValueError(f"{data.prefix}: max images per chunk must be >= 1, got {max_images}")
    params = {"seq_length": spec.seq_length, "tokens_per_image": spec.tokens_per_image, "max_images": max_images,
              "tokenizer": data.meta["tokenizer"]}
    return cached_plan(data.prefix, "chunks", params, 4, partial(
        chunk_plan, seq_length=spec.seq_length, tokens_per_image=spec.tokens_per_image, max_images=max_images),
        cache_dir, identity=data.identity)


class InterleavedView:
    kind = "interleaved"

    def __init__(self, data: MultimodalIndexed, spec: SeqSpec, max_images: int = MAX_IMAGES_PER_CHUNK,
                 cache_dir: str = ""):
        self.data, self.spec, self.max_images = data, spec, max_images
        self.plan = MappedPlan(plan_chunks(data, spec, max_images, cache_dir))  # (num_chunks, 4), memory-mapped

    def __len__(self) -> int:
        return len(self.plan.array)

    def build(self, index: int, key: tuple) -> Sample:
        first, offset, last, stop = (int(x) for x in self.plan.array[index])
        items = []
        for i in range(first, last + 1):
            lo = offset if i == first else 0
            hi = stop if i == last else int(self.data.lengths[i])
            items.append(self.data.read_item(i, hi - lo, lo))
        return assemble(items, self.spec, self.kind, self.max_images)


def plan_pair_windows(data: MultimodalIndexed, pairs_per_window: int, cache_dir: str = "") -> np.ndarray:
    """Each image with the text item right after it is a pair; windows of consecutive pairs:
    (num_windows, pairs_per_window) image items, a document's last window padded with -1
    (plans.pair_window_plan, cached beside the dataset)."""
    params = {"pairs_per_window": pairs_per_window, "tokenizer": data.meta["tokenizer"]}
    build = partial(_windows_block, pairs_per_window=pairs_per_window)
    return cached_plan(data.prefix, "pair-windows", params, pairs_per_window, build, cache_dir, identity=data.identity)


def _windows_block(lengths, modes, doc_index, pairs_per_window):
    return pair_window_plan(modes, doc_index, pairs_per_window)


class PairsWindowView:
    kind = "interleaved_pairs"

    def __init__(self, data: MultimodalIndexed, spec: SeqSpec, pairs_per_window: int = PAIRS_PER_WINDOW,
                 max_tokens: int = PAIRS_WINDOW_TOKENS, cache_dir: str = ""):
        self.data, self.spec = data, spec
        self.seq_length = min(max_tokens, spec.seq_length)
        self.plan = MappedPlan(plan_pair_windows(data, pairs_per_window, cache_dir))  # (windows, pairs_per_window)

    def __len__(self) -> int:
        return len(self.plan.array)

    def build(self, index: int, key: tuple) -> Sample:
        items = []
        for image_item in (int(i) for i in self.plan.array[index] if i >= 0):
            items.append(self.data.read_item(image_item))
            items.append(self.data.read_item(image_item + 1))  # full: assemble counts what is cut
        return assemble(items, self.spec, self.kind, seq_length=self.seq_length)


class VideoView:
    kind = "video"

    def __init__(self, data: MultimodalIndexed, spec: SeqSpec):
        self.data, self.spec = data, spec

    def __len__(self) -> int:
        return len(self.data)

    def build(self, index: int, key: tuple) -> Sample:
        return assemble(self.data.read_document(index), self.spec, self.kind)


def make_view(data: MultimodalIndexed, spec: SeqSpec, view: str = "", cache_dir: str = ""):
    """cache_dir: where plans go when the dataset's directory is read-only (plan_cache.py)."""
    if data.kind == "conversation":
        return ConversationView(data, spec)
    if data.kind == "pairs":
        return PairView(data, spec)
    if data.kind == "video":
        return VideoView(data, spec)
    if view == "pairs":
        return PairsWindowView(data, spec, cache_dir=cache_dir)
    return InterleavedView(data, spec, cache_dir=cache_dir)


def collate(samples: list[Sample], spec: SeqSpec, image_size: int = 224) -> dict:
    """One sample per row, padded to seq_length with [PAD]; images in order of appearance."""
    rows = [(s.tokens, s.images) for s in samples]
    return {**batch_tensors(rows, spec, image_size), **answer_masks([[s] for s in samples], spec),
            **sample_counts(samples)}


def answer_masks(rows: list[list[Sample]], spec: SeqSpec) -> dict:
    """Conversations: {"answer_mask": (B, L)} over the rows' samples in order; else nothing.
    A micro-batch mixing conversations with other data is refused (which tokens to train?)."""
    has = {s.answer_mask is not None for row in rows for s in row}
    if has != {True}:
        if True in has:
            raise ValueError("a micro-batch mixes conversations with pretraining samples; blend them in separate runs")
        return {}
    return {"answer_mask": answer_mask_rows([[m for s in row for m in s.answer_mask] for row in rows], spec.seq_length)}


def batch_tensors(rows: list[tuple[list[int], list[np.ndarray]]], spec: SeqSpec, image_size: int = 224) -> dict:
    """(tokens, images) per row -> tokens (B, L) padded with [PAD], the rows' images stacked
    in order of appearance, and the cross-entropy loss mask."""
    tokens = torch.full((len(rows), spec.seq_length), spec.pad_id, dtype=torch.long)  # (B, L)
    for b, (row, _) in enumerate(rows):
        tokens[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    all_images = [img for _, images in rows for img in images]
    if all_images:
        images = torch.from_numpy(np.stack(all_images))  # (N, 3, S, S) uint8
    else:
        images = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    ignored = torch.tensor([spec.pad_id, spec.image_id, spec.img_start_id, spec.img_end_id])
    # 1 where the token is a cross-entropy target (spec section 4's ignore set).
    return {"tokens": tokens, "images": images, "loss_mask": (~torch.isin(tokens, ignored)).float()}


def sample_counts(samples: list[Sample]) -> dict:
    """Samples per kind, and what the views had to cut (never silent)."""
    kinds: dict[str, int] = {}
    for s in samples:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    return {"num_samples_by_kind": kinds, "dropped_images": sum(s.dropped_images for s in samples),
            "truncated_tokens": sum(s.truncated_tokens for s in samples)}
