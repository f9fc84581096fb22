"""Our multimodal documents in megatron-core's indexed format (.bin/.idx, multimodal=True).

Layout (readable by megatron-core's own IndexedDataset(prefix, multimodal=True)):
- one megatron "document" per source document; its sequences are the document's items
  in reading order;
- mode TEXT (0): token ids; mode ANSWER (2): token ids an instruction-tuned model is
  trained to produce (the <Answer> spans of a conversation, data/instruct.py); mode IMAGE (1): a uint8 (3, S, S) image whose raw bytes are
  stored reinterpreted as the dataset's token dtype (uint16 for vocabularies < 65500),
  so images cost exactly their byte size on disk and reading one is a memcpy;
- a sidecar `<prefix>.json` records the kind (pairs | interleaved | video), image size,
  tokenizer fingerprint and file sizes, so that a wrong tokenizer or a truncated /
  mismatched file is refused with a one-line error instead of yielding garbage.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from megatron_emu.files import read_json

MODE_TEXT = 0
MODE_IMAGE = 1
MODE_ANSWER = 2
FORMAT = "megatron_emu.multimodal.v1"
KINDS = ("pairs", "interleaved", "video", "conversation")


def _mcore():
    # Imported lazily: megatron.core's package import costs seconds.
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


class DocumentWriter:
    """Appends documents of (kind, value) items through megatron-core's IndexedDatasetBuilder."""

    def __init__(self, prefix: str, vocab_size: int, image_size: int = 224):
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.image_size = image_size
        if (3 * image_size * image_size) % np.dtype(self.dtype).itemsize:
            raise ValueError(f"{prefix}: image size {image_size} does not pack into {np.dtype(self.dtype).name}")
        self.builder = _mcore().IndexedDatasetBuilder(prefix + ".bin", dtype=self.dtype, multimodal=True)
        self.num_documents = 0
        self.num_images = 0

    def add_document(self, items: list[tuple[int, np.ndarray]]) -> None:
        """items: (MODE_TEXT or MODE_ANSWER, int ids) or (MODE_IMAGE, uint8 (3, S, S))."""
        for mode, value in items:
            if mode == MODE_IMAGE:
                if value.dtype != np.uint8 or value.shape != (3, self.image_size, self.image_size):
                    raise ValueError(f"{self.prefix}: image must be uint8 (3, {self.image_size}, {self.image_size})")
                packed = np.ascontiguousarray(value).reshape(-1).view(self.dtype)
                self.builder.add_item(torch.from_numpy(packed), mode=MODE_IMAGE)
                self.num_images += 1
            else:
                self.builder.add_item(torch.from_numpy(np.asarray(value, dtype=self.dtype)), mode=mode)
        self.builder.end_document()
        self.num_documents += 1

    def add_index(self, prefix: str) -> None:
        """Append a finished partial dataset (merging per-worker outputs)."""
        self.builder.add_index(prefix)

    def finalize(self, meta: dict) -> None:
        self.builder.finalize(self.prefix + ".idx")
        write_meta(self.prefix, meta)


def write_meta(prefix: str, meta: dict) -> None:
    meta = dict(meta, format=FORMAT, bin_bytes=os.path.getsize(prefix + ".bin"),
                idx_bytes=os.path.getsize(prefix + ".idx"))
    tmp = prefix + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, prefix + ".json")


def read_meta(prefix: str) -> dict:
    path = prefix + ".json"
    meta = read_json(path, "missing or unreadable dataset metadata", reason_type_only=True)
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise ValueError(f"{path}: not a {FORMAT} dataset description")
    return meta


class MultimodalIndexed:
    """Read side: documents as lists of (mode, array) with every consistency check up front."""

    def __init__(self, prefix: str, tokenizer_fingerprint: str | None = None, vocab_size: int | None = None):
        self.prefix = prefix
        self.meta = read_meta(prefix)
        self.kind = self.meta["kind"]
        self.image_size = int(self.meta["image_size"])
        if tokenizer_fingerprint is not None and self.meta["tokenizer"] != tokenizer_fingerprint:
            raise ValueError(
                f"{prefix}.json: written with tokenizer {self.meta['tokenizer']}, refusing tokenizer {tokenizer_fingerprint}"
            )
        if vocab_size is not None and self.meta["vocab_size"] != vocab_size:
            raise ValueError(f"{prefix}.json: written for vocab size {self.meta['vocab_size']}, not {vocab_size}")
        _check_files(prefix, self.meta)
        try:
            self.ds = _mcore().IndexedDataset(prefix, multimodal=True)
        except (AssertionError, ValueError, OSError) as e:
            raise ValueError(f"{prefix}.idx: unreadable index ({e})") from None
        self.dtype = self.ds.index.dtype
        self.lengths = self.ds.index.sequence_lengths
        self.modes = self.ds.index.sequence_modes
        self.doc_index = self.ds.index.document_indices  # doc d = items [doc_index[d], doc_index[d+1])
        expected_bytes = int(self.ds.index.sequence_pointers[-1]) + int(self.lengths[-1]) * np.dtype(self.dtype).itemsize \
            if len(self.lengths) else 0
        if expected_bytes != os.path.getsize(prefix + ".bin"):
            raise ValueError(f"{prefix}.idx: describes {expected_bytes} bytes but {prefix}.bin has "
                             f"{os.path.getsize(prefix + '.bin')} (truncated or mismatched pair)")
        image_items = int(3 * self.image_size ** 2 // np.dtype(self.dtype).itemsize)
        if np.any(self.lengths[self.modes == MODE_IMAGE] != image_items):
            raise ValueError(f"{prefix}.idx: image items are not {self.image_size}x{self.image_size} uint8")

    def __len__(self) -> int:
        return len(self.doc_index) - 1

    def item_range(self, doc: int) -> range:
        return range(int(self.doc_index[doc]), int(self.doc_index[doc + 1]))

    def read_item(self, item: int, max_tokens: int | None = None, offset: int = 0) -> tuple[int, np.ndarray]:
        """(MODE_TEXT, int64 ids) or (MODE_IMAGE, uint8 (3, S, S)); text optionally a slice
        of at most max_tokens ids from `offset`."""
        mode = int(self.modes[item])
        if mode == MODE_IMAGE:
            raw = self.ds.get(item)[0]
            # Copied: a view would outlive megatron-core's mmap, which closes with the dataset.
            return mode, raw.view(np.uint8).reshape(3, self.image_size, self.image_size).copy()
        rest = int(self.lengths[item]) - offset
        length = rest if max_tokens is None else min(max_tokens, rest)
        return mode, self.ds.get(item, offset, length)[0].astype(np.int64)

    def read_document(self, doc: int) -> list[tuple[int, np.ndarray]]:
        return [self.read_item(i) for i in self.item_range(doc)]


def _check_files(prefix: str, meta: dict) -> None:
    for ext in (".bin", ".idx"):
        path = prefix + ext
        if not os.path.exists(path):
            raise ValueError(f"{path}: missing")
        if os.path.getsize(path) != meta[ext[1:] + "_bytes"]:
            raise ValueError(f"{path}: has {os.path.getsize(path)} bytes, metadata says {meta[ext[1:] + '_bytes']} "
                             "(truncated or replaced)")
