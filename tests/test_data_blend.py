"""Per-global-batch shares, megatron-core-style greedy blending, per-dataset epochs."""

from collections import Counter

import numpy as np
import pytest

from megatron_emu.data.blend import BatchPlan, batch_shares, greedy_blend, parse_data_path, sample_index


def test_parse_data_path():
    assert parse_data_path(["a"]) == [(1.0, "a")]
    assert parse_data_path(["128", "laion", "64", "mmc4"]) == [(128.0, "laion"), (64.0, "mmc4")]
    for bad, msg in ((["1", "a", "2"], "pairs"), (["x", "a"], "not a number"), (["-1", "a"], "negative"),
                     (["0", "a", "0", "b"], "zero")):
        with pytest.raises(ValueError, match=msg):
            parse_data_path(bad)


def test_paper_shares_are_taken_as_is():
    assert batch_shares([128, 128, 64, 16, 16], 352) == [128, 128, 64, 16, 16]
    assert batch_shares([128, 128, 64, 16, 16], 176) == [64, 64, 32, 8, 8]
    for g in range(1, 40):
        s = batch_shares([8, 2, 1], g)
        assert sum(s) == g and all(abs(c - w / 11 * g) < 1 for c, w in zip(s, [8, 2, 1]))


def test_shares_plan_is_exact_per_batch_and_draws_are_consecutive():
    plan = BatchPlan([128, 128, 64, 16, 16], 352, seed=0)
    for b in range(3):
        slots = plan.batch(b)
        assert Counter(d for d, _ in slots) == {0: 128, 1: 128, 2: 64, 3: 16, 4: 16}
        for d, share in enumerate([128, 128, 64, 16, 16]):  # dataset d's draws b*share .. (b+1)*share-1
            assert sorted(j for dd, j in slots if dd == d) == list(range(b * share, (b + 1) * share))
    assert plan.batch(0) != plan.batch(1)  # slots shuffled per batch (seeded)
    assert plan.batch(1) == BatchPlan([128, 128, 64, 16, 16], 352, seed=0).batch(1)


def test_greedy_blend_matches_megatron_rule_and_weights():
    ids = greedy_blend([0.5, 0.3, 0.2], 1000)
    counts = np.bincount(ids)
    assert counts.tolist() == [500, 300, 200]
    for n in (10, 97, 500):  # every prefix stays within one sample of the target
        assert np.all(np.abs(np.bincount(ids[:n], minlength=3) - np.array([0.5, 0.3, 0.2]) * n) <= 1)


def test_weighted_plan_draws_are_unique_and_consecutive():
    plan = BatchPlan([3, 1], 7, seed=0, policy="weighted")
    draws = {0: [], 1: []}
    for b in range(1300):  # crosses several 4096-sample blocks
        for d, j in plan.batch(b):
            draws[d].append(j)
    for d in (0, 1):
        assert draws[d] == list(range(len(draws[d])))
    assert abs(len(draws[0]) / (7 * 1300) - 0.75) < 1e-3


def test_sample_index_reshuffles_each_epoch_and_covers_everything():
    n = 10
    epoch0 = [sample_index(1, 0, j, n) for j in range(n)]
    epoch1 = [sample_index(1, 0, j, n) for j in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 == [sample_index(1, 0, j, n) for j in range(n)]


def test_split_fractions_and_ranges():
    from megatron_emu.data.blend import parse_split, split_range

    assert parse_split("") == (1.0, 0.0, 0.0)
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.030, 0.001))
    assert parse_split("98,2") == pytest.approx((0.98, 0.02, 0.0))
    ranges = [split_range(1000, parse_split("969,30,1"), name) for name in ("train", "valid", "test")]
    assert ranges == [(0, 969), (969, 999), (999, 1000)]  # contiguous, every sample in one split
    assert split_range(7, parse_split("1,1,1"), "test")[1] == 7
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)
