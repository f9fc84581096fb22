"""megatron-core's .idx layout, read in blocks of documents and written with numpy.

The layout (megatron/core/datasets/indexed_dataset.py, _IndexWriter, version 1):
    b"MMIDIDX\\x00\\x00", <Q version=1>, <B dtype code>, <Q sequence count S>, <Q document count D>,
    int32 lengths[S], int64 byte pointers[S], int64 document indices[D] (D = documents + 1,
    starting at 0), int8 modes[S] (multimodal only).

megatron-core's IndexedDataset maps the file, which is O(1) at open; but a pass over the
whole index through that map leaves every page of it resident in the process (a 10^8-document
index is GBs). Plan builders therefore read the index block by block into ordinary memory
(np.fromfile), so their peak memory is one block whatever the dataset size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}


@dataclass
class IdxFile:
    path: str
    num_sequences: int
    num_documents: int

    @classmethod
    def open(cls, path: str) -> "IdxFile":
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
            raise ValueError(f"{path}: not a megatron-core index (bad header)")
        sequences, documents = struct.unpack("<QQ", head[18:34])
        return cls(path, sequences, documents - 1)

    def _read(self, dtype, offset: int, start: int, count: int) -> np.ndarray:
        out = np.fromfile(self.path, dtype=dtype, count=count, offset=offset + start * np.dtype(dtype).itemsize)
        if len(out) != count:
            raise ValueError(f"{self.path}: truncated index")
        return out

    def block(self, first_doc: int, stop_doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lengths, modes, document indices) of documents [first_doc, stop_doc); the
        document indices (stop_doc - first_doc + 1 of them) are absolute sequence numbers."""
        s = self.num_sequences
        doc_index = self._read(np.int64, HEADER_BYTES + 12 * s, first_doc, stop_doc - first_doc + 1)
        lo, hi = int(doc_index[0]), int(doc_index[-1])
        lengths = self._read(np.int32, HEADER_BYTES, lo, hi - lo)
        modes = self._read(np.int8, HEADER_BYTES + 12 * s + 8 * (self.num_documents + 1), lo, hi - lo)
        return lengths, modes, doc_index


def write_idx(path: str, lengths: np.ndarray, modes: np.ndarray, doc_index: np.ndarray, dtype) -> None:
    """The .idx megatron-core's IndexedDatasetBuilder(multimodal=True) would write for these
    sequences, built with vectorised numpy (for synthetic datasets of 10^8 documents)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<QQ", len(lengths), len(doc_index)))
        for array, dt in ((lengths, np.int32), (pointers, np.int64), (doc_index, np.int64), (modes, np.int8)):
            np.asarray(array, dtype=dt).tofile(f)
