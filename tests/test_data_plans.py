"""The vectorised chunk / window plans (data/plans.py) equal the per-document loops they
replace, kept here as the reference, on adversarial documents and the bundled corpus."""

import numpy as np
import pytest

from megatron_emu.data.idx_file import IdxFile, write_idx
from megatron_emu.data.indexed import MODE_IMAGE, MODE_TEXT
from megatron_emu.data.plans import chunk_plan, pair_window_plan


class Index:
    """What the reference loops read of a MultimodalIndexed: lengths, modes, item ranges."""

    def __init__(self, docs):  # docs: lists of ("t", length) / ("i",)
        self.lengths = np.array([it[1] if it[0] == "t" else 25088 for d in docs for it in d], dtype=np.int32)
        self.modes = np.array([MODE_TEXT if it[0] == "t" else MODE_IMAGE for d in docs for it in d], dtype=np.int8)
        self.doc_index = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)

    def __len__(self):
        return len(self.doc_index) - 1

    def item_range(self, doc):
        return range(int(self.doc_index[doc]), int(self.doc_index[doc + 1]))


def reference_chunks(data, limit, tpi, max_images):
    """The previous release's plan_chunks, verbatim but for the spec fields."""
    lengths, modes = data.lengths, data.modes
    chunks = []
    for doc in range(len(data)):
        cur = None  # [first_item, first_offset, last_item, last_stop, used, images]
        for item in data.item_range(doc):
            if modes[item] == MODE_IMAGE:
                if cur is not None and (cur[5] == max_images or cur[4] + tpi > limit):
                    chunks.append(cur[:4])  # the image opens the next chunk
                    cur = None
                if cur is None:
                    cur = [item, 0, item, 0, 2, 0]  # used = BOS + EOS
                cur[2:] = [item, 0, cur[4] + tpi, cur[5] + 1]
                continue
            n, pos = int(lengths[item]), 0
            while pos < n:
                if cur is None:
                    cur = [item, pos, item, pos, 2, 0]
                take = min(limit - cur[4], n - pos)  # >= 1: a full chunk is closed at once
                pos += take
                cur[2:] = [item, pos, cur[4] + take, cur[5]]
                if cur[4] >= limit:
                    chunks.append(cur[:4])
                    cur = None
        if cur is not None:
            chunks.append(cur[:4])
    return np.asarray(chunks, dtype=np.int64).reshape(-1, 4)


def reference_windows(data, pairs_per_window):
    """The previous release's plan_pair_windows, verbatim."""
    modes, windows = data.modes, []
    for doc in range(len(data)):
        r = data.item_range(doc)
        pairs = [i for i in r[:-1] if modes[i] == MODE_IMAGE and modes[i + 1] == MODE_TEXT]
        for k in range(0, len(pairs), pairs_per_window):
            windows.append(pairs[k:k + pairs_per_window])
    return windows


def padded(windows, width):
    return np.array([w + [-1] * (width - len(w)) for w in windows], dtype=np.int64).reshape(-1, width)


def check(docs, limit, tpi=34, max_images=5, width=5):
    data = Index(docs)
    got = chunk_plan(data.lengths, data.modes, data.doc_index, limit, tpi, max_images)
    np.testing.assert_array_equal(got, reference_chunks(data, limit, tpi, max_images))
    np.testing.assert_array_equal(pair_window_plan(data.modes, data.doc_index, width),
                                  padded(reference_windows(data, width), width))


T, I = (lambda n: ("t", n)), ("i",)

ADVERSARIAL = {
    "empty document and empty text": [[], [T(0)], [T(0), T(0)], [T(3)], []],
    "text longer than seq_length": [[T(1000)], [T(62), T(62), T(1)], [T(61), T(1), T(62)]],
    "image-only": [[I] * 13, [I]],
    "text-only": [[T(5), T(7), T(200)]],
    "image fills exactly, then text": [[T(28), I, T(10)], [T(28), I, T(0), T(0), T(4)], [T(28), I, I, T(1)]],
    "image fills exactly at the end": [[T(28), I], [T(28), I, T(0)]],
    "image straddles the end": [[T(29), I, T(3)], [T(40), I, T(40), I]],
    "max_images boundaries": [[I, T(1)] * 5 + [I], [I] * 5 + [T(2)] + [I] * 6, [I, T(0)] * 11],
    "image right after a full text chunk": [[T(62), I, T(62)], [T(124), I]],
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_documents_equal_the_reference(name):
    for limit, max_images in ((64, 5), (64, 1), (36, 5), (37, 2), (200, 3)):
        check(ADVERSARIAL[name], limit, max_images=max_images)


def random_docs(rng, num_docs, image_rate, max_text):
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(0, 25))
        docs.append([I if rng.random() < image_rate else T(int(rng.integers(0, max_text))) for _ in range(n)])
    return docs


@pytest.mark.parametrize("seed", range(6))
def test_random_documents_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, 300, image_rate=[0.1, 0.4, 0.8][seed % 3], max_text=[20, 150, 2000][seed // 2])
    for limit in (36, 40, 64, 101, 1024):
        check(docs, limit, max_images=int(rng.integers(1, 7)), width=int(rng.integers(1, 6)))


def test_blocks_concatenate_to_the_whole_plan(tmp_path):
    docs = random_docs(np.random.default_rng(9), 200, 0.3, 300)
    data = Index(docs)
    write_idx(str(tmp_path / "x.idx"), data.lengths, data.modes, data.doc_index, np.uint16)
    idx = IdxFile.open(str(tmp_path / "x.idx"))
    parts = [chunk_plan(*idx.block(lo, min(lo + 37, len(data))), 128, 34, 5) for lo in range(0, len(data), 37)]
    np.testing.assert_array_equal(np.concatenate(parts), reference_chunks(data, 128, 34, 5))


def test_numpy_written_index_is_byte_identical_to_megatron_cores(tmp_path):
    from megatron_emu.data.indexed import DocumentWriter, MultimodalIndexed

    w = DocumentWriter(str(tmp_path / "ref"), vocab_size=1000, image_size=8)
    img = np.zeros((3, 8, 8), dtype=np.uint8)
    for items in ([(MODE_TEXT, np.arange(5)), (MODE_IMAGE, img)], [], [(MODE_IMAGE, img)], [(MODE_TEXT, [])]):
        w.add_document(items)
    w.finalize({"kind": "interleaved", "image_size": 8, "tokenizer": "t", "vocab_size": 1000})
    ref = MultimodalIndexed(str(tmp_path / "ref"))
    write_idx(str(tmp_path / "ours.idx"), ref.lengths, ref.modes, ref.doc_index, np.uint16)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    idx = IdxFile.open(str(tmp_path / "ours.idx"))
    lengths, modes, doc_index = idx.block(1, 4)
    assert (idx.num_documents, lengths.tolist(), modes.tolist(), doc_index.tolist()) == (4, [96, 0], [1, 0], [2, 2, 3, 4])
