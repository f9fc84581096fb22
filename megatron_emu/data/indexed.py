"""Our multimodal documents in megatron-core's indexed format (.bin/.idx, multimodal=True).

Layout (readable by megatron-core's own IndexedDataset(prefix, multimodal=True)):
- one megatron "document" per source document; its sequences are the document's items
  in reading order;
- mode TEXT (0): token ids; mode ANSWER (2): token ids an instruction-tuned model is
  trained to produce (the <Answer> spans of a conversation, data/instruct.py); mode IMAGE (1): the image's bytes stored reinterpreted as the
  dataset's token dtype (uint16 for vocabularies < 65500): with image_format "raw" a uint8
  (3, S, S) array (reading one is a memcpy), with "jpeg" the JPEG file, zero-padded to a
  whole number of tokens (decoded in the loader's workers; data/images.py);
- a sidecar `<prefix>.json` records the kind (pairs | interleaved | video), image size and
  format, tokenizer fingerprint, file sizes and xxh3_64 checksums of the .bin and .idx,
  so that a wrong tokenizer or a truncated / corrupted / mismatched file is refused with
  a one-line error instead of yielding garbage. Opening checks the .idx checksum (once per
  file version: data/checksums.py keeps a stamp); tools/validate_data.py checks the .bin.
  A dataset written before checksums existed is accepted with one warning, as Megatron
  accepts its older index versions.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import xxhash

from megatron_emu.data.checksums import HashingWriter, file_xxh3, verify_file
from megatron_emu.data.images import IMAGE_FORMATS, decode_jpeg, encode_jpeg
from megatron_emu.data.locks import sidecar_base
from megatron_emu.data.plan_cache import file_identity
from megatron_emu.files import read_json, write_json_atomic

MODE_TEXT = 0
MODE_IMAGE = 1
MODE_ANSWER = 2
FORMAT = "megatron_emu.multimodal.v1"
KINDS = ("pairs", "interleaved", "video", "conversation")


def _mcore():
    # Imported lazily: megatron.core's package import costs seconds. Its package import
    # also pulls in its optimizers and FSDP, which warn four times (in every rank) that
    # Transformer Engine and Apex are missing: we use neither of those modules.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


class DocumentWriter:
    """Appends documents of (kind, value) items through megatron-core's IndexedDatasetBuilder."""

    def __init__(self, prefix: str, vocab_size: int, image_size: int = 224, image_format: str = "raw"):
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.image_size, self.image_format = image_size, image_format
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"{prefix}: image format {image_format!r} is not one of {IMAGE_FORMATS}")
        if image_format == "raw" and (3 * image_size * image_size) % np.dtype(self.dtype).itemsize:
            raise ValueError(f"{prefix}: image size {image_size} does not pack into {np.dtype(self.dtype).name}")
        self.builder = _mcore().IndexedDatasetBuilder(prefix + ".bin", dtype=self.dtype, multimodal=True)
        self.builder.data_file = HashingWriter(self.builder.data_file)  # the .bin's checksum, while writing
        self.num_documents = 0
        self.num_images = 0

    def add_document(self, items: list[tuple[int, object]]) -> None:
        """items: (MODE_TEXT or MODE_ANSWER, int ids) or (MODE_IMAGE, uint8 (3, S, S) or, for jpeg, JPEG bytes)."""
        for mode, value in items:
            if mode == MODE_IMAGE:
                self.builder.add_item(torch.from_numpy(self._image_tokens(value)), mode=MODE_IMAGE)
                self.num_images += 1
            else:
                self.builder.add_item(torch.from_numpy(np.asarray(value, dtype=self.dtype)), mode=mode)
        self.builder.end_document()
        self.num_documents += 1

    def _image_tokens(self, value) -> np.ndarray:
        """An image as the token-dtype array stored for it."""
        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8 or value.shape != (3, self.image_size, self.image_size):
                raise ValueError(f"{self.prefix}: image must be uint8 (3, {self.image_size}, {self.image_size})")
            if self.image_format == "raw":
                return np.ascontiguousarray(value).reshape(-1).view(self.dtype)
            value = encode_jpeg(value)
        elif self.image_format == "raw":
            raise ValueError(f"{self.prefix}: a raw-format dataset stores pixels, not encoded bytes")
        pad = -len(value) % np.dtype(self.dtype).itemsize  # JPEG decoders ignore bytes after the end marker
        return np.frombuffer(bytearray(value) + bytearray(pad), dtype=self.dtype)

    def add_index(self, prefix: str, bin_xxh3: str | None = None) -> None:
        """Append a finished partial dataset (merging per-worker outputs); its .bin is
        copied as bytes, so nothing is decoded again, and checked against `bin_xxh3` (its
        recorded checksum) on the way."""
        data_file = self.builder.data_file
        data_file.part = xxhash.xxh3_64()
        self.builder.add_index(prefix)
        copied, data_file.part = data_file.part.hexdigest(), None
        if bin_xxh3 is not None and copied != bin_xxh3:
            raise ValueError(f"{prefix}.bin: checksum xxh3_64 {copied} differs from {bin_xxh3} recorded in its "
                             ".json (corrupted since it was written)")

    def finalize(self, meta: dict) -> None:
        self.builder.finalize(self.prefix + ".idx")
        write_meta(self.prefix, dict(meta, image_format=self.image_format),
                   bin_xxh3=self.builder.data_file.hexdigest())


def write_meta(prefix: str, meta: dict, bin_xxh3: str | None = None) -> None:
    """The .json, written last (it marks the dataset complete), with sizes and checksums."""
    meta = dict(meta, format=FORMAT, bin_bytes=os.path.getsize(prefix + ".bin"),
                idx_bytes=os.path.getsize(prefix + ".idx"), idx_xxh3=file_xxh3(prefix + ".idx"),
                bin_xxh3=bin_xxh3 or file_xxh3(prefix + ".bin"))
    write_json_atomic(prefix + ".json", meta)  # fsynced: the marker never outlives its data in a crash


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
        self.image_format = self.meta.get("image_format", "raw")  # older datasets: raw
        self.vocab_size = int(self.meta["vocab_size"])
        if tokenizer_fingerprint is not None and self.meta["tokenizer"] != tokenizer_fingerprint:
            raise ValueError(
                f"{prefix}.json: written with tokenizer {self.meta['tokenizer']}, refusing tokenizer {tokenizer_fingerprint}"
            )
        if vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(f"{prefix}.json: written for vocab size {self.meta['vocab_size']}, not {vocab_size}")
        _check_files(prefix, self.meta)  # one-line errors for missing files before anything else
        self.identity = file_identity(prefix)  # before the .idx is read: its plans are keyed by it (plan_cache.py)
        check_idx_checksum(prefix, self.meta)
        try:
            self.ds = _mcore().IndexedDataset(prefix, multimodal=True)
        except (AssertionError, ValueError, OSError) as e:
            raise ValueError(f"{prefix}.idx: unreadable index ({e})") from None
        self.dtype = self.ds.index.dtype
        self.lengths = self.ds.index.sequence_lengths
        self.modes = self.ds.index.sequence_modes
        self.doc_index = self.ds.index.document_indices  # doc d = items [doc_index[d], doc_index[d+1])
        self._check_structure()

    def _check_structure(self) -> None:
        prefix = self.prefix
        expected_bytes = int(self.ds.index.sequence_pointers[-1]) + int(self.lengths[-1]) * np.dtype(self.dtype).itemsize \
            if len(self.lengths) else 0
        if expected_bytes != os.path.getsize(prefix + ".bin"):
            raise ValueError(f"{prefix}.idx: describes {expected_bytes} bytes but {prefix}.bin has "
                             f"{os.path.getsize(prefix + '.bin')} (truncated or mismatched pair)")
        if "num_documents" in self.meta and len(self) != self.meta["num_documents"]:
            raise ValueError(f"{prefix}.idx: holds {len(self)} documents, {prefix}.json says "
                             f"{self.meta['num_documents']} (mismatched pair)")
        # Image item sizes are checked per image when read (read_image), not here: a pass over
        # every item would make opening a 10^9-item dataset take seconds and keep its whole
        # index resident in every process.
        self.image_items = int(3 * self.image_size ** 2 // np.dtype(self.dtype).itemsize)

    def __len__(self) -> int:
        return len(self.doc_index) - 1

    def item_range(self, doc: int) -> range:
        return range(int(self.doc_index[doc]), int(self.doc_index[doc + 1]))

    def document_of(self, item: int) -> int:
        return int(np.searchsorted(self.doc_index, item, side="right")) - 1

    def bad_item(self, item: int, problem: str) -> ValueError:
        """The one-line error for a stored item that cannot be used: prefix, document, sequence."""
        return ValueError(f"{self.prefix}: document {self.document_of(item)}, sequence {item}: {problem}")

    def read_item(self, item: int, max_tokens: int | None = None, offset: int = 0) -> tuple[int, np.ndarray]:
        """(MODE_TEXT, int64 ids) or (MODE_IMAGE, uint8 (3, S, S)); text optionally a slice
        of at most max_tokens ids from `offset`. A bad item raises bad_item's error."""
        mode = int(self.modes[item])
        if mode == MODE_IMAGE:
            return mode, self.read_image(item)
        rest = int(self.lengths[item]) - offset
        length = rest if max_tokens is None else min(max_tokens, rest)
        ids = self.ds.get(item, offset, length)[0].astype(np.int64)
        if len(ids) and (ids.max() >= self.vocab_size or ids.min() < 0):
            bad = int(ids.max()) if ids.max() >= self.vocab_size else int(ids.min())
            raise self.bad_item(item, f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        return mode, ids

    def read_image(self, item: int) -> np.ndarray:
        length = int(self.lengths[item])
        if self.image_format == "raw" and length != self.image_items:
            raise self.bad_item(item, f"not a {self.image_size}x{self.image_size} uint8 image ({length} items)")
        if length == 0:
            raise self.bad_item(item, "empty JPEG image item")
        raw = self.ds.get(item)[0]
        if self.image_format == "raw":
            # Copied: a view would outlive megatron-core's mmap, which closes with the dataset.
            return raw.view(np.uint8).reshape(3, self.image_size, self.image_size).copy()
        try:
            return decode_jpeg(raw.view(np.uint8), self.image_size)  # (3, S, S); padding zeros are ignored
        except ValueError as e:
            raise self.bad_item(item, str(e)) from None

    def read_document(self, doc: int) -> list[tuple[int, np.ndarray]]:
        return [self.read_item(i) for i in self.item_range(doc)]


_WARNED_NO_CHECKSUM: set[str] = set()


def check_idx_checksum(prefix: str, meta: dict) -> None:
    """The .idx against its recorded checksum; a dataset from before checksums warns once."""
    if "idx_xxh3" in meta:
        verify_file(prefix + ".idx", meta["idx_xxh3"], stamp=sidecar_base(prefix) + ".idx-verified.json")
    elif prefix not in _WARNED_NO_CHECKSUM:
        _WARNED_NO_CHECKSUM.add(prefix)
        warnings.warn(f"{prefix}.json records no checksums (written before they existed): its .idx and .bin "
                      "cannot be verified; preprocess it again to add them", stacklevel=3)


def _check_files(prefix: str, meta: dict) -> None:
    for ext in (".bin", ".idx"):
        path = prefix + ext
        if not os.path.exists(path):
            raise ValueError(f"{path}: missing")
        if os.path.getsize(path) != meta[ext[1:] + "_bytes"]:
            raise ValueError(f"{path}: has {os.path.getsize(path)} bytes, metadata says {meta[ext[1:] + '_bytes']} "
                             "(truncated or replaced)")
