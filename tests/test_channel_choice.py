"""Best channel per member: empirical-Bayes shrinkage, eligibility, exploration, learning."""

import numpy as np
import pytest

from membercare.optimise.channel_choice import (
    NO_CHANNEL,
    EngagementCounts,
    best_engagement,
    choose_channels,
    fit_prior_strength,
    group_codes,
    group_rates,
    posterior_params,
)

EMAIL, SMS, PUSH = 0, 1, 2


def test_counts_from_long_form_rows_add_up():
    c = EngagementCounts.from_events(3, 3, member_index=[0, 0, 1, 2, 2], channel_index=[0, 0, 2, 1, 1],
                                     sends=[1, 1, 4, 2, 3], engagements=[1, 0, 2, 0, 1])
    assert c.sends.tolist() == [[2, 0, 0], [0, 0, 4], [0, 5, 0]]
    assert c.engagements.tolist() == [[1, 0, 0], [0, 0, 2], [0, 1, 0]]
    with pytest.raises(ValueError):
        EngagementCounts(np.array([[1]]), np.array([[2]]))


def test_group_rates_shrink_small_groups_toward_the_channel_rate():
    # Group 0: 10,000 email sends at 20 %; group 1: 10 email sends, all engaged.
    sends = np.array([[10_000, 0, 0], [10, 0, 0]])
    eng = np.array([[2_000, 0, 0], [10, 0, 0]])
    r = group_rates(EngagementCounts(sends, eng), group=[0, 1], group_strength=50)
    overall = 2010 / 10010
    assert r[0, EMAIL] == pytest.approx((2000 + 50 * overall) / 10050)
    assert r[1, EMAIL] == pytest.approx((10 + 50 * overall) / 60)  # ~0.33, not 1.0
    assert r[0, SMS] == pytest.approx(0.05)  # no sends anywhere: the base rate


def test_member_posterior_moves_from_the_group_prior_to_own_history():
    rates = np.array([[0.2, 0.1, 0.1]])
    none = EngagementCounts(np.zeros((1, 3), int), np.zeros((1, 3), int))
    a, b = posterior_params(none, [0], rates, prior_strength=10)
    assert (a / (a + b))[0].tolist() == pytest.approx([0.2, 0.1, 0.1])
    lots = EngagementCounts(np.array([[200, 0, 0]]), np.array([[120, 0, 0]]))
    a, b = posterior_params(lots, [0], rates, prior_strength=10)
    assert a[0, EMAIL] / (a[0, EMAIL] + b[0, EMAIL]) == pytest.approx((2 + 120) / 210)


def test_choice_respects_eligibility_and_members_without_channels():
    alpha = np.array([[50.0, 1, 1], [50.0, 1, 1], [1.0, 1, 1]])
    beta = np.array([[50.0, 99, 99], [50.0, 99, 99], [1.0, 1, 1]])
    eligible = np.array([[True, True, True], [False, True, True], [False, False, False]])
    rng = np.random.default_rng(0)
    for method in ("thompson", "epsilon"):
        ch = choose_channels(alpha, beta, eligible, rng=rng, method=method, epsilon=0.5)
        assert ch.channel[1] in (SMS, PUSH)
        assert ch.channel[2] == NO_CHANNEL and np.isnan(ch.posterior_mean[2])
        assert ch.greedy[0] == EMAIL


def test_exploration_is_small_when_evidence_is_strong_and_large_when_weak():
    n = 5000
    rng = np.random.default_rng(1)
    eligible = np.ones((n, 3), bool)
    strong_a = np.tile([300.0, 100.0, 100.0], (n, 1))
    strong_b = np.tile([700.0, 900.0, 900.0], (n, 1))
    weak_a = np.tile([3.0, 2.0, 2.0], (n, 1))
    weak_b = np.tile([7.0, 8.0, 8.0], (n, 1))
    strong = choose_channels(strong_a, strong_b, eligible, rng=rng)
    weak = choose_channels(weak_a, weak_b, eligible, rng=rng)
    assert strong.explored.mean() < 0.001
    assert 0.2 < weak.explored.mean() < 0.8
    eps = choose_channels(strong_a, strong_b, eligible, rng=rng, method="epsilon", epsilon=0.1)
    # A random eligible channel is the greedy one a third of the time: ~6.7 % explored.
    assert 0.05 < eps.explored.mean() < 0.085


def test_fitted_prior_strength_recovers_the_true_heterogeneity():
    rng = np.random.default_rng(9)
    n = 20_000
    group = rng.integers(0, 2, n)
    mu = np.array([[0.10, 0.30], [0.20, 0.05]])[group]  # group x channel rates
    kappa = np.array([20.0, 4.0])  # homogeneous on channel 0, very heterogeneous on channel 1
    theta = rng.beta(kappa * mu, kappa * (1 - mu))
    sends = rng.integers(2, 12, (n, 2))
    counts = EngagementCounts(sends, rng.binomial(sends, theta))
    rates = group_rates(counts, group)
    fitted = fit_prior_strength(counts, group, rates)
    assert fitted[0] == pytest.approx(20.0, rel=0.25)
    assert fitted[1] == pytest.approx(4.0, rel=0.25)
    # No usable history: the default.
    empty = EngagementCounts(np.zeros((10, 2), int), np.zeros((10, 2), int))
    assert fit_prior_strength(empty, np.zeros(10, int), rates[:1]).tolist() == [5.0, 5.0]


def _learning_curve(rounds: int, seed: int, informative_groups: bool) -> list[float]:
    # Hidden truth: each member engages on one channel at 30 %, on the others at 5 %. With informative
    # groups, 70 % of a group's members share the group's channel (as members of one age group x segment do).
    rng = np.random.default_rng(seed)
    n = 4000
    ages, segs = rng.choice(["18-24", "25-34", "35+"], n), rng.choice(["vip", "new"], n)
    group, labels = group_codes(ages, segs)
    typical = rng.integers(0, 3, len(labels))
    best = np.where(informative_groups & (rng.random(n) < 0.7), typical[group], rng.integers(0, 3, n))
    p = np.full((n, 3), 0.05)
    p[np.arange(n), best] = 0.30
    eligible = np.ones((n, 3), bool)
    sends, eng = np.zeros((n, 3), np.int64), np.zeros((n, 3), np.int64)
    hit = []
    for _ in range(rounds):
        ch = best_engagement(EngagementCounts(sends, eng), group, eligible, rng=rng, n_groups=len(labels))
        engaged = rng.random(n) < p[np.arange(n), ch.channel]
        sends[np.arange(n), ch.channel] += 1
        eng[np.arange(n), ch.channel] += engaged
        hit.append(float((ch.channel == best).mean()))
    return hit


def test_best_engagement_learns_from_similar_members_first_then_from_each_member():
    hit = _learning_curve(rounds=10, seed=42, informative_groups=True)
    assert hit[0] < 0.45  # round 1: no information, about a third right
    assert hit[2] > 0.55  # group rates already route most members well
    assert hit[-1] > 0.68 and hit[-1] > hit[2] + 0.05  # individual histories add the rest


def test_best_engagement_learns_individual_preferences_when_groups_say_nothing():
    hit = _learning_curve(rounds=15, seed=7, informative_groups=False)
    assert hit[0] < 0.4
    assert hit[-1] > hit[0] + 0.15


def test_group_codes_are_stable_and_sorted():
    codes, labels = group_codes(["b", "a", None, "a"], [1, 1, 1, 2])
    assert labels == [("a", 1), ("a", 2), ("b", 1), (None, 1)]
    assert codes.tolist() == [2, 0, 3, 1]


def test_stated_preference_leans_members_without_history_and_yields_to_evidence():
    n = 3000
    rates = np.array([[0.10, 0.10, 0.10]])
    group = np.zeros(n, int)
    preferred = np.full(n, PUSH)
    eligible = np.ones((n, 3), bool)
    fresh = EngagementCounts(np.zeros((n, 3), int), np.zeros((n, 3), int))
    a, b = posterior_params(fresh, group, rates, preferred=preferred, preference_weight=0.5)
    ch = choose_channels(a, b, eligible, rng=np.random.default_rng(4))
    assert (ch.channel == PUSH).mean() > 0.45  # vs a third without the preference
    assert np.all(ch.greedy == PUSH)
    # Ten ignored pushes and five engaged emails outweigh the stated preference.
    seen = EngagementCounts(np.tile([10, 0, 10], (n, 1)), np.tile([5, 0, 0], (n, 1)))
    a, b = posterior_params(seen, group, rates, preferred=preferred, preference_weight=0.5)
    assert np.all(choose_channels(a, b, eligible, rng=np.random.default_rng(4)).greedy == EMAIL)


def test_rates_from_sql_totals_equal_group_rates():
    from membercare.optimise.channel_choice import overall_rates, rates_from_totals

    rng = np.random.default_rng(5)
    sends = rng.integers(0, 6, (300, 3))
    eng = rng.binomial(sends, 0.2)
    group = rng.integers(0, 5, 300)
    N = np.zeros((5, 3))
    E = np.zeros((5, 3))
    np.add.at(N, group, sends)
    np.add.at(E, group, eng)
    expected = group_rates(EngagementCounts(sends, eng), group, 5)
    assert np.allclose(rates_from_totals(N, E), expected)
    assert np.allclose(overall_rates(N, E), E.sum(0) / N.sum(0))
    assert np.allclose(overall_rates(np.zeros((2, 3)), np.zeros((2, 3))), 0.05)
    with pytest.raises(ValueError):
        rates_from_totals(N, N + 1)
