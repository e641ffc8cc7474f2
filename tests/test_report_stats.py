"""Report statistics: member-clustered intervals on recurring campaigns, Holm, sample-ratio mismatch, MDE."""

from __future__ import annotations

import math

import numpy as np
import pytest

from membercare.reports.stats import (
    ClusterSums,
    clustered_lift,
    holm,
    minimum_detectable_effect,
    sample_ratio_mismatch,
)


def recurring(rng, members: int, occurrences: int, mean: float = 0.05, icc: float = 0.2):
    """Per member: successes over ``occurrences`` rows, each member with an own rate ~ Beta (ICC ``icc``)."""
    total = 1.0 / icc - 1.0
    rate = rng.beta(mean * total, (1 - mean) * total, size=members)
    return rng.binomial(occurrences, rate), np.full(members, occurrences)


def test_clustered_interval_is_wider_than_the_naive_one_on_a_recurring_campaign():
    rng = np.random.default_rng(17)
    # The holdout and the treated members are the same members in each of 20 occurrences; ICC 0.2.
    t = ClusterSums.from_arrays(*recurring(rng, 5000, 20))
    c = ClusterSums.from_arrays(*recurring(rng, 1000, 20))
    lift = clustered_lift(t, c)
    naive = lift.naive_interval[1] - lift.naive_interval[0]
    clustered = lift.clustered_interval[1] - lift.clustered_interval[0]
    assert clustered > naive
    # sqrt(1 + (m - 1) ICC) = sqrt(1 + 19 * 0.2) = 2.19
    assert clustered / naive == pytest.approx(math.sqrt(1 + 19 * 0.2), rel=0.15)
    assert lift.design_effect == pytest.approx((clustered / naive) ** 2)
    # One row per member: nothing to cluster, the two intervals agree.
    one = clustered_lift(ClusterSums.from_arrays(*recurring(rng, 20_000, 1)),
                         ClusterSums.from_arrays(*recurring(rng, 20_000, 1)))
    assert one.design_effect == pytest.approx(1.0, abs=0.03)


def test_clustered_interval_keeps_its_coverage_where_the_naive_one_does_not():
    # 300 A/A recurring campaigns (no true difference): how often does each 95 % interval contain 0?
    # Binomial error of a coverage estimate over 300 campaigns at 95 %: 1.3 points.
    rng = np.random.default_rng(5)
    covered_naive = covered_clustered = 0
    sims = 300
    for _ in range(sims):
        lift = clustered_lift(ClusterSums.from_arrays(*recurring(rng, 400, 20)),
                              ClusterSums.from_arrays(*recurring(rng, 400, 20)))
        covered_naive += lift.naive_interval[0] <= 0 <= lift.naive_interval[1]
        covered_clustered += lift.clustered_interval[0] <= 0 <= lift.clustered_interval[1]
    assert covered_clustered / sims >= 0.91
    assert covered_naive / sims <= 0.80


def test_holm_adjusts_step_down_and_keeps_the_input_order():
    got = holm({"clicks": 0.01, "revenue": 0.04, "visits": 0.03, "orders": 0.005})
    assert [(r.name, round(r.adjusted, 6), r.reject) for r in got] == [
        ("clicks", 0.03, True), ("revenue", 0.06, False), ("visits", 0.06, False), ("orders", 0.02, True)]
    assert holm({"a": 0.9})[0].adjusted == 0.9
    with pytest.raises(ValueError):
        holm({"a": 1.5})


def test_sample_ratio_mismatch():
    ok = sample_ratio_mismatch({"treated": 9012, "holdout": 988}, {"treated": 0.9, "holdout": 0.1})
    assert not ok.mismatch and ok.p_value > 0.5
    bad = sample_ratio_mismatch({"a": 5200, "b": 4800}, {"a": 1, "b": 1})
    assert bad.chi_square == pytest.approx(16.0) and bad.p_value == pytest.approx(6.33e-5, rel=0.01)
    assert bad.mismatch
    with pytest.raises(ValueError):
        sample_ratio_mismatch({"a": 1}, {"a": 1.0, "b": 1.0})


def test_minimum_detectable_effect():
    # Issue 17: a 10 % holdout of 10,000 members at 1 % conversion detects only +0.93 points.
    assert minimum_detectable_effect(9000, 1000, 0.01) == pytest.approx(0.0093, abs=0.00005)
    # Clustered rows need a larger effect: sqrt(design effect) times.
    assert minimum_detectable_effect(9000, 1000, 0.01, design_effect=4.0) == pytest.approx(2 * 0.00929, rel=0.01)
    assert minimum_detectable_effect(0, 1000, 0.01) == math.inf
