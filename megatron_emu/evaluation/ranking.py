"""Metrics over scored candidates: VisDial's NDCG and MRR (the challenge's definitions), top-1 accuracy.

`scores` are the model's per-candidate scores (higher = more likely); rank 1 is the best.
NDCG (VisDial v1.0): with k = the number of candidates of non-zero relevance, the DCG of
the model's top k over the DCG of the ideal top k, gains discounted by log2(rank + 1).
Ties in the scores rank the earlier candidate first (a stable sort), so results are exact.
"""

from __future__ import annotations

import math


def ranking(scores: list[float]) -> list[int]:
    """Candidate indices, best first (stable: ties keep candidate order)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def rank_of(scores: list[float], target: int) -> int:
    """1-based rank of candidate `target`."""
    return ranking(scores).index(target) + 1


def reciprocal_rank(scores: list[float], target: int) -> float:
    return 1.0 / rank_of(scores, target)


def ndcg(scores: list[float], relevance: list[float]) -> float:
    if len(scores) != len(relevance):
        raise ValueError(f"NDCG: {len(scores)} scores for {len(relevance)} relevance values")
    k = sum(r > 0 for r in relevance)
    if k == 0:
        return 0.0
    discount = [1.0 / math.log2(rank + 2) for rank in range(k)]
    dcg = sum(relevance[i] * d for i, d in zip(ranking(scores)[:k], discount))
    ideal = sum(r * d for r, d in zip(sorted(relevance, reverse=True)[:k], discount))
    return dcg / ideal


def top1_correct(scores: list[float], target: int) -> float:
    return float(ranking(scores)[0] == target)
