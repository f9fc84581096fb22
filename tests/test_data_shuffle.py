"""The per-index shuffle (data/shuffle.py): a bijection of [0, n) in O(1) memory."""

import tracemalloc

import numpy as np
import pytest

from megatron_emu.data.blend import sample_index
from megatron_emu.data.shuffle import epoch_index, permute, round_keys

SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 33, 97, 127, 128, 129, 1000, 1021, 1024, 4095, 4097, 65536, 65537]


@pytest.mark.parametrize("n", SIZES)
def test_a_permutation_for_every_n(n):
    out = permute(np.arange(n), n, round_keys(3, 1, 0))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_large_n_has_no_collisions_on_a_sample_and_stays_in_range():
    n = 2 * 10 ** 9 + 11  # LAION-2B-sized, not a power of two
    idx = np.random.default_rng(0).choice(n, 200_000, replace=False)
    out = permute(idx, n, round_keys(0, 0, 0))
    assert len(np.unique(out)) == len(idx)
    assert out.min() >= 0 and out.max() < n


def test_different_per_seed_dataset_and_epoch_and_deterministic():
    n = 1000
    base = permute(np.arange(n), n, round_keys(0, 0, 0))
    for other in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert not np.array_equal(base, permute(np.arange(n), n, round_keys(*other)))
    np.testing.assert_array_equal(base, permute(np.arange(n), n, round_keys(0, 0, 0)))
    # Not the identity, nor a rotation: shuffled.
    assert np.mean(base == np.arange(n)) < 0.02 and len(np.unique((base - np.arange(n)) % n)) > n // 2


def test_scalar_and_vector_agree_across_epochs():
    n = 37
    draws = np.arange(5 * n)
    vec = epoch_index(4, 2, draws, n)
    assert vec.tolist() == [sample_index(4, 2, int(j), n) for j in draws]
    for e in range(5):  # every sample exactly once per epoch
        assert sorted(vec[e * n:(e + 1) * n].tolist()) == list(range(n))


def test_mapping_a_few_indices_of_a_billion_allocates_nothing_of_size_n():
    n = 10 ** 9
    round_keys.cache_clear()
    tracemalloc.start()
    try:
        out = [sample_index(7, 0, j, n) for j in (0, 1, n - 1, n, 5 * n + 3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(0 <= x < n for x in out)
    assert peak < 64 * 1024, peak  # a permutation of n would be 8 GB


class _Numbered:
    """A view whose sample i is the token sequence [BOS, 100 + i]."""

    kind = "pair"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def build(self, index, key):
        from megatron_emu.data.samples import Sample

        return Sample([1, 100 + index], [], self.kind)


def _stream(n, dp_size, dp_rank, micro, count, start=0):
    from megatron_emu.data.blend import BatchPlan
    from megatron_emu.data.loader import MicroBatches
    from megatron_emu.data.samples import SeqSpec

    spec = SeqSpec(seq_length=4, bos_id=1, eos_id=2, pad_id=0, img_start_id=3, img_end_id=4, image_id=5)
    ds = MicroBatches([_Numbered(n)], BatchPlan([1.0], 8, seed=5), spec, dp_rank=dp_rank, dp_size=dp_size,
                      micro_batch_size=micro, seed=5)
    return [int(t) - 100 for m in range(start, start + count) for t in ds[m]["tokens"][:, 1]]


def test_loader_reads_every_sample_once_per_epoch_over_dp_ranks_and_resumes_exactly():
    n = 24  # 3 global batches of 8 per epoch
    ranks = [_stream(n, 2, r, 2, 2 * 6) for r in range(2)]  # 2 micro-batches per rank per batch, 6 batches
    batches = [ranks[r][b * 4:(b + 1) * 4] for b in range(6) for r in range(2)]  # rank slices of each batch
    assert all(not set(batches[2 * b]) & set(batches[2 * b + 1]) for b in range(6))  # DP slices disjoint
    stream = [s for part in batches for s in part]
    for e in range(2):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:]  # reshuffled between epochs
    assert _stream(n, 2, 1, 2, 5, start=7) == ranks[1][7 * 2:12 * 2]  # resume at micro-batch 7
