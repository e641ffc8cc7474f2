"""Exploration with logged propensities and inverse-propensity learning (membercare.optimise.causal)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from membercare.optimise import causal
from membercare.optimise.send_time import AllowedHours


def test_explore_one_propensities_sum_to_one_and_match_frequencies():
    rng = random.Random(1)
    options = ["email", "sms", "push"]
    seen: dict[str, list[float]] = {o: [] for o in options}
    for _ in range(30_000):
        c, p = causal.explore_one("sms", options, 0.1, rng)
        seen[c].append(p)
    probs = {o: seen[o][0] for o in options}
    assert probs["sms"] == pytest.approx(0.9 + 0.1 / 3)
    assert probs["email"] == pytest.approx(0.1 / 3)
    assert sum(probs.values()) == pytest.approx(1.0)
    for o in options:
        assert len(seen[o]) / 30_000 == pytest.approx(probs[o], abs=0.01)


def test_explore_vectorised_respects_eligibility():
    rng = np.random.default_rng(0)
    el = np.array([[True, False, True], [False, True, False], [False, False, False]] * 1000)
    greedy = np.array([0, 1, 0] * 1000)
    ex = causal.explore(greedy, el, 0.5, rng)
    rows = np.arange(el.shape[0])
    ok = ex.choice >= 0
    assert el[rows[ok], ex.choice[ok]].all()
    assert (ex.choice[2::3] == -1).all()
    assert np.allclose(ex.propensity[1::3], 1.0)  # a single eligible option is always taken
    p0 = ex.propensity[0::3]
    assert set(np.round(p0, 6)) == {0.25, 0.75}


@pytest.mark.parametrize("a, b", [
    ([3.0, 5.0, 2.0], [40.0, 45.0, 10.0]),
    ([0.3, 0.5, 0.25], [4.7, 4.5, 4.75]),  # alpha < 1: densities singular at 0 (members without history)
    ([200.0, 210.0], [2000.0, 2000.0]),  # concentrated posteriors
    ([0.25, 60.0], [4.75, 600.0]),
])
def test_thompson_probabilities_match_monte_carlo(a, b):
    p = causal.thompson_probabilities(a, b)
    rng = np.random.default_rng(0)
    draws = rng.beta(np.array(a)[:, None], np.array(b)[:, None], (len(a), 400_000))
    mc = np.bincount(draws.argmax(axis=0), minlength=len(a)) / 400_000
    assert p == pytest.approx(mc, abs=0.005)


def test_ipw_hour_learning_ignores_the_shops_own_schedule():
    """The shop sends 90 % of messages at 10:00 (greedy) and explores 10 % uniformly over 9..20. The true rate peaks at
    19:00. Counting engagements by hour would call 10:00 best (most clicks happen there); the inverse-propensity
    rate finds 19:00."""
    rng = np.random.default_rng(7)
    n = 40_000
    allowed = AllowedHours(9, 21)
    hours = np.flatnonzero(allowed.mask())
    greedy = np.full(n, np.searchsorted(hours, 10))
    ex = causal.explore(greedy, np.ones((n, hours.size), bool), 0.1, rng)
    send_hour = hours[ex.choice]
    d = np.abs(send_hour - 19)
    p_true = 0.05 + 0.10 * np.exp(-0.5 * (d / 2.0) ** 2)
    engaged = rng.random(n) < p_true
    naive_counts = np.bincount(send_hour[engaged], minlength=24)
    assert naive_counts.argmax() == 10
    rates = causal.hour_rates(np.zeros(n, np.int64), send_hour, engaged, ex.propensity, 1)
    best = causal.best_hours(rates, allowed)
    assert abs(int(best[0]) - 19) <= 1
    # Unsent hours have no evidence: a group without data keeps the population's curve / the default.
    assert causal.best_hours(rates, allowed, default_hour=10, min_weight=1e9)[0] == 10


def test_option_rates_recover_channel_rates_under_confounded_routing():
    """Members who prefer SMS engage more on SMS and are routed there; the IPW rate per channel is the rate the whole
    group would have on that channel."""
    rng = np.random.default_rng(3)
    n = 60_000
    theta = np.stack([rng.beta(2, 30, n), rng.beta(2, 30, n)], axis=1)
    prefers_sms = rng.random(n) < 0.5
    theta[prefers_sms, 1] *= 3.0
    greedy = prefers_sms.astype(np.int64)
    ex = causal.explore(greedy, np.ones((n, 2), bool), 0.2, rng)
    engaged = rng.random(n) < theta[np.arange(n), ex.choice]
    rates = causal.option_rates(np.zeros(n, np.int64), ex.choice, engaged, ex.propensity, 1, 2, strength=0.0)
    truth = theta.mean(axis=0)
    naive = [engaged[ex.choice == c].mean() for c in (0, 1)]
    assert rates.rate[0] == pytest.approx(truth, rel=0.08)
    assert naive[1] > 1.3 * truth[1]  # routing's selection bias, which IPW removes


def test_policy_name():
    assert causal.policy_name("causal_hour", 0.1) == "causal_hour/explore=0.1/v1"
    assert causal.policy_name("best_engagement", 0) == "best_engagement/explore=0/v1"
