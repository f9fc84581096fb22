"""Which dataset fills each slot of each global batch, and which of its samples.

Two policies over `--data-path W1 P1 W2 P2 ...`:
- "shares" (default, the paper's recipe): weights are per-global-batch shares. Every
  global batch holds exactly round(W_d / sum(W) * global_batch_size) samples of dataset d
  (largest-remainder rounding, so they sum to the batch; the paper's 128/128/64/16/16
  with a global batch of 352 is taken as is). Slots are shuffled within the batch
  (seeded) so that micro-batches are mixed.
- "weighted" (megatron-core's BlendedDataset): the stream follows megatron-core's greedy
  rule -- sample i goes to the dataset with the largest error W_d * max(i, 1) - count_d --
  which keeps every prefix of the stream as close to the weights as possible; batches are
  not exact. The rule is applied per block of BLOCK samples, so position i's dataset is a
  table lookup and a resume needs no replay.

Within dataset d, draw j (its j-th sample in the stream) is element j % n of a seeded
permutation of its n samples for epoch j // n, evaluated per index (shuffle.py: a Feistel
bijection, O(1) time and memory whatever n). Everything is a pure function of
(seed, global batch index, slot), which is what makes resume exact.
"""

from __future__ import annotations

import numpy as np

from megatron_emu.data.shuffle import permute, round_keys

BLOCK = 4096


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """Megatron style: [P] or [W1, P1, W2, P2, ...] -> [(weight, prefix)]."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise ValueError(f"--data-path: expected weight/prefix pairs, got {len(data_path)} values: {data_path}")
    out = []
    for w, p in zip(data_path[::2], data_path[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--data-path: weight {w!r} for {p} is not a number") from None
        if weight < 0:
            raise ValueError(f"--data-path: negative weight {w} for {p}")
        out.append((weight, p))
    if sum(w for w, _ in out) <= 0:
        raise ValueError(f"--data-path: weights sum to zero: {data_path}")
    return out


def batch_shares(weights: list[float], global_batch_size: int) -> list[int]:
    """Exact per-batch sample counts (largest remainder; ties go to the earlier dataset)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * global_batch_size
    counts = np.floor(exact + 1e-9).astype(np.int64)
    order = sorted(range(len(w)), key=lambda d: (-(exact[d] - counts[d]), d))
    for d in order[: global_batch_size - int(counts.sum())]:
        counts[d] += 1
    return counts.tolist()


def greedy_blend(weights: list[float], size: int) -> np.ndarray:
    """megatron-core's build_blending_indices rule: dataset id per stream position."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.zeros(len(w), dtype=np.int64)
    out = np.empty(size, dtype=np.int64)
    for i in range(size):
        d = int(np.argmax(w * max(i, 1) - counts))
        out[i] = d
        counts[d] += 1
    return out


class BatchPlan:
    """Global batch b -> [(dataset id, draw number)] of length global_batch_size."""

    def __init__(self, weights: list[float], global_batch_size: int, seed: int, policy: str = "shares"):
        if policy not in ("shares", "weighted"):
            raise ValueError(f"data blend policy must be 'shares' or 'weighted', got {policy!r}")
        self.global_batch_size, self.seed, self.policy = global_batch_size, seed, policy
        if policy == "shares":
            self.shares = batch_shares(weights, global_batch_size)
        else:
            self.block = greedy_blend(weights, BLOCK)  # (BLOCK,) dataset ids
            self.block_counts = np.bincount(self.block, minlength=len(weights))  # (D,)
            # rank of position i among the block's positions of the same dataset
            self.block_rank = np.zeros(BLOCK, dtype=np.int64)
            seen = np.zeros(len(weights), dtype=np.int64)
            for i, d in enumerate(self.block):
                self.block_rank[i] = seen[d]
                seen[d] += 1

    def batch(self, b: int) -> list[tuple[int, int]]:
        if self.policy == "shares":
            slots = [(d, b * c + k) for d, c in enumerate(self.shares) for k in range(c)]
            perm = np.random.default_rng([self.seed, 0xB1E, b]).permutation(len(slots))
            return [slots[i] for i in perm]
        pos = np.arange(b * self.global_batch_size, (b + 1) * self.global_batch_size)
        blk, within = pos // BLOCK, pos % BLOCK
        d = self.block[within]
        return list(zip(d.tolist(), (blk * self.block_counts[d] + self.block_rank[within]).tolist()))


def sample_index(seed: int, dataset: int, draw: int, n: int) -> int:
    """The draw-th sample of a dataset of n samples: seeded reshuffle every epoch, computed
    per index (shuffle.py), so no permutation of the dataset is ever stored."""
    if n <= 0:
        raise ValueError(f"dataset {dataset} has no samples")
    epoch, pos = divmod(draw, n)
    return int(permute(pos, n, round_keys(seed, dataset, epoch))[0])


SPLITS = ("train", "valid", "test")


def parse_split(split: str) -> tuple[float, float, float]:
    """Megatron's --split "969,30,1" -> train / valid / test fractions ("" = all train)."""
    if not split:
        return (1.0, 0.0, 0.0)
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to 3 comma-separated numbers, e.g. 969,30,1") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to 3 non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return tuple(p / sum(parts) for p in parts)


def split_range(n: int, fractions: tuple[float, float, float], name: str) -> tuple[int, int]:
    """Samples [start, stop) of a dataset of n that belong to split `name` (contiguous, as Megatron)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * n)))
    bounds[-1] = n  # rounding never loses the last samples
    i = SPLITS.index(name)
    return min(bounds[i], n), min(bounds[i + 1], n)
