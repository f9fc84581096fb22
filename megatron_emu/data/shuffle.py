"""A seeded permutation of [0, n) evaluated one index at a time: O(1) time and memory.

Shuffling a dataset of 2x10^9 samples by materialising `rng.permutation(n)` costs 16 GB and
minutes in every rank and DataLoader worker at every epoch. Instead, position j of epoch e
maps to `permute(j)`, a bijection built from a Feistel network (Luby-Rackoff: a few rounds of
a keyed hash make a pseudo-random permutation):

- the domain is [0, 2^bits) with 2^bits the smallest power of two >= n (at least 4, so both
  halves have a bit); an unbalanced Feistel round maps (L: a bits, R: b bits) to
  (R, L xor F(R)), which is invertible, so every round and the network are bijections;
- cycle walking restricts it to [0, n): re-apply the network while the value is >= n. The
  walk from x < n stays on x's cycle, so it ends at the next element of [0, n) on that cycle,
  which is again a bijection; at most half the domain lies outside [0, n), so on average
  fewer than 2 applications are needed;
- the round keys come from numpy's SeedSequence of (seed, dataset, epoch).

Everything is vectorised over numpy arrays of indices (uint64 arithmetic wraps by design).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

ROUNDS = 6  # even: the halves end where they started; >= 4 for a pseudo-random permutation
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's mixer


@lru_cache(maxsize=64)
def round_keys(seed: int, dataset: int, epoch: int) -> np.ndarray:
    """ROUNDS uint64 keys, a pure function of (seed, dataset, epoch)."""
    return np.random.SeedSequence([seed, 0x5F1E, dataset, epoch]).generate_state(ROUNDS, np.uint64)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """The round function: splitmix64's finaliser of x xor key."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, bits: int, keys: np.ndarray) -> np.ndarray:
    """One pass of the network over [0, 2^bits)."""
    a, b = bits // 2, bits - bits // 2  # (L, R) widths; they swap every round
    for key in keys:
        left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
        x = (right << np.uint64(a)) | ((left ^ _mix(right, key)) & np.uint64((1 << a) - 1))
        a, b = b, a
    return x


def permute(index, n: int, keys: np.ndarray) -> np.ndarray:
    """Image of `index` (int or int array, values in [0, n)) under the keyed bijection of [0, n)."""
    x = np.array(index, dtype=np.uint64, ndmin=1)
    if n <= 1:
        return np.zeros_like(x, dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())
    x = _feistel(x, bits, keys)
    outside = np.flatnonzero(x >= np.uint64(n))
    while outside.size:  # cycle walking
        x[outside] = _feistel(x[outside], bits, keys)
        outside = outside[x[outside] >= np.uint64(n)]
    return x.astype(np.int64)


def epoch_index(seed: int, dataset: int, draw, n: int) -> np.ndarray:
    """Sample of each draw (array): draw j is element j % n of epoch j // n's permutation."""
    draw = np.array(draw, dtype=np.int64, ndmin=1)
    epoch, pos = np.divmod(draw, n)
    out = np.empty_like(draw)
    for e in np.unique(epoch):  # a handful of epochs per call at most
        at = epoch == e
        out[at] = permute(pos[at], n, round_keys(seed, dataset, int(e)))
    return out
