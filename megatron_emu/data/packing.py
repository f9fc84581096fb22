"""Sequence packing (--pack-sequences): a micro-batch's samples share rows of seq_length.

Without packing every sample fills its own row and the rest is [PAD]: a caption pair
of ~60 tokens in a 1024-token row wastes 94% of the row's compute. Packed, the same
samples (the same global-batch recipe, nothing added or dropped) are laid out first-fit
decreasing into as few rows as fit them. `document_ids` (B, S) says which sample each
token belongs to; the model restarts positions and masks attention at every document
boundary and the loss trains no target across one (model/llama.py, model/loss.py), so
each sample is computed exactly as it would be alone in its row.

Row r's document ids count 0, 1, ... in order; the row's trailing [PAD] is one more
document of its own (it attends only to itself and is never a target).
"""

from __future__ import annotations

import torch

from megatron_emu.data.samples import Sample, SeqSpec, answer_masks, batch_tensors, sample_counts


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: longest first, each into the first row with room.
    Within a row the samples keep their original order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"sample of {lengths[i]} tokens is longer than --seq-length {capacity}")
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return [sorted(row) for row in rows]


def collate_packed(samples: list[Sample], spec: SeqSpec, image_size: int = 224) -> dict:
    """collate()'s batch with the samples packed into rows, plus document_ids (rows, S)."""
    rows = first_fit_decreasing([len(s.tokens) for s in samples], spec.seq_length)
    joined = [([t for i in row for t in samples[i].tokens], [im for i in row for im in samples[i].images])
              for row in rows]
    batch = batch_tensors(joined, spec, image_size)  # tokens, images in row-major order, loss_mask
    document_ids = torch.empty_like(batch["tokens"])  # (R, S)
    for r, row in enumerate(rows):
        ids = [d for d, i in enumerate(row) for _ in samples[i].tokens]
        document_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        document_ids[r, len(ids):] = len(row)  # the trailing [PAD] is a document of its own
    masks = answer_masks([[samples[i] for i in row] for row in rows], spec)  # conversations
    return {**batch, **masks, "document_ids": document_ids, **sample_counts(samples)}


def pad_rows(batch: dict, rows: int, pad_id: int) -> dict:
    """Append [PAD] rows (each its own document) up to `rows`: pipeline stages need one
    micro-batch shape per step. Adds no target: [PAD] is never trained on."""
    missing = rows - batch["tokens"].shape[0]
    if missing <= 0:
        return batch
    extend = lambda t, value: torch.cat([t, t.new_full((missing, *t.shape[1:]), value)])  # noqa: E731
    masks = {"answer_mask": extend(batch["answer_mask"], 0)} if "answer_mask" in batch else {}
    return {**batch, **masks, "tokens": extend(batch["tokens"], pad_id), "loss_mask": extend(batch["loss_mask"], 0),
            "document_ids": extend(batch["document_ids"], 0)}
