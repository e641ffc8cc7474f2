"""CUPED (membercare.reports.cuped): narrower intervals, no bias, nominal coverage, the OLS point estimate, and the
report's pre-period covariate from the database (both backends)."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest

from membercare.reports.cuped import CovariateSums, cuped_lift
from membercare.reports.stats import ClusterSums, clustered_lift
from test_attribution import T0, Shop


def _experiment(rng: np.random.Generator, n_t: int, n_c: int, effect: float, rho: float = 0.7):
    """Spend-like outcome: a log-normal-ish pre-period spend ``x`` and an outcome correlated with it."""
    n = n_t + n_c
    x = rng.gamma(2.0, 500.0, n)
    noise = rng.normal(0.0, 1.0, n) * x.std() * math.sqrt(1 - rho**2) / rho
    y = 100.0 + x + noise
    y[:n_t] += effect
    return (CovariateSums.from_arrays(y[:n_t], x[:n_t]), CovariateSums.from_arrays(y[n_t:], x[n_t:]), y, x)


def test_cuped_interval_is_narrower_and_the_estimate_unbiased_over_many_seeds():
    effect, estimates, ratios, raw = 50.0, [], [], []
    rng = np.random.default_rng(20261205)
    for _ in range(400):
        t, c, _, _ = _experiment(rng, 600, 400, effect)
        r = cuped_lift(t, c)
        assert r is not None
        estimates.append(r.difference)
        raw.append(r.unadjusted_difference)
        ratios.append((r.interval[1] - r.interval[0]) / (r.unadjusted_interval[1] - r.unadjusted_interval[0]))
        assert r.interval[1] - r.interval[0] < r.unadjusted_interval[1] - r.unadjusted_interval[0]
        assert r.width_ratio == pytest.approx(ratios[-1])
    est = np.array(estimates)
    # Unbiased: the mean of 400 estimates within 3 standard errors of the planted effect.
    assert abs(est.mean() - effect) < 3 * est.std(ddof=1) / math.sqrt(len(est))
    # rho = 0.7: the interval shrinks by sqrt(1 - 0.49) = 0.71, and the estimates really vary that much less.
    assert np.mean(ratios) == pytest.approx(math.sqrt(1 - 0.49), abs=0.03)
    assert est.std() / np.std(raw) == pytest.approx(math.sqrt(1 - 0.49), abs=0.06)


def test_cuped_keeps_its_nominal_coverage_on_an_aa_test():
    rng = np.random.default_rng(17)
    covered, reps = 0, 2000
    for _ in range(reps):
        t, c, _, _ = _experiment(rng, 300, 300, 0.0, rho=0.8)
        r = cuped_lift(t, c, confidence=0.95)
        assert r is not None
        covered += r.interval[0] <= 0.0 <= r.interval[1]
    # 95 % nominal; 2,000 replications: standard error 0.5 point.
    assert 0.935 <= covered / reps <= 0.965


def test_cuped_point_estimate_is_the_ols_coefficient_of_the_arm():
    """``y ~ 1 + arm + x`` by least squares (what statsmodels.OLS fits): the arm's coefficient is the CUPED
    estimate and the covariate's the pooled theta; the classical OLS standard error is within a few percent."""
    rng = np.random.default_rng(5)
    t, c, y, x = _experiment(rng, 700, 300, 80.0)
    r = cuped_lift(t, c)
    arm = np.r_[np.ones(700), np.zeros(300)]
    design = np.column_stack([np.ones_like(y), arm, x])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    assert r.difference == pytest.approx(beta[1], rel=1e-9)
    assert r.theta == pytest.approx(beta[2], rel=1e-9)
    resid = y - design @ beta
    cov = resid @ resid / (len(y) - 3) * np.linalg.inv(design.T @ design)
    se = (r.interval[1] - r.interval[0]) / (2 * 1.959963984540054)
    assert se == pytest.approx(math.sqrt(cov[1, 1]), rel=0.05)


def test_cuped_against_statsmodels_when_installed():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(9)
    t, c, y, x = _experiment(rng, 500, 500, 30.0)
    arm = np.r_[np.ones(500), np.zeros(500)]
    fit = sm.OLS(y, sm.add_constant(np.column_stack([arm, x]))).fit(cov_type="HC1")
    r = cuped_lift(t, c)
    assert r.difference == pytest.approx(fit.params[1], rel=1e-9)
    assert (r.interval[1] - r.interval[0]) / 2 / 1.96 == pytest.approx(fit.bse[1], rel=0.03)


def test_without_covariate_information_cuped_is_the_clustered_lift():
    """A constant covariate: theta 0, no reduction, and the unadjusted interval is the report's clustered one
    (member clusters with several rows each)."""
    rng = np.random.default_rng(3)
    rows_t, rows_c = rng.integers(1, 6, 200), rng.integers(1, 6, 100)
    y_t, y_c = rng.binomial(rows_t, 0.3), rng.binomial(rows_c, 0.2)
    t = CovariateSums.from_arrays(y_t, rows_t * 1.0, rows_t)
    c = CovariateSums.from_arrays(y_c, rows_c * 1.0, rows_c)
    r = cuped_lift(t, c, metric="conversion")
    ref = clustered_lift(ClusterSums.from_arrays(y_t, rows_t), ClusterSums.from_arrays(y_c, rows_c))
    assert r.theta == pytest.approx(0.0, abs=1e-9) and r.variance_reduction == pytest.approx(0.0, abs=1e-9)
    assert r.difference == pytest.approx(ref.difference)
    assert r.unadjusted_interval == pytest.approx(ref.clustered_interval)
    assert cuped_lift(CovariateSums.from_arrays([1.0], [1.0]), c) is None


def test_report_cuped_uses_the_spend_before_the_runs_as_of(engine):
    """Twenty treated and twenty held-out members; the big pre-period spenders buy big after the campaign too, in
    both arms. The report's CUPED revenue lift keeps the unadjusted arms' figures, explains most of the variance and
    narrows the interval; an order after as_of is no covariate, one older than the pre-period neither."""
    from membercare.reports import ReportOptions, build_report
    from membercare.reports.text import print_experiments

    s = Shop(engine)
    run = s.run("winback", as_of=T0)
    rng = np.random.default_rng(1)
    treated, held = [s.member() for _ in range(20)], [s.member() for _ in range(20)]
    for m in treated:
        s.message(run, m, at=T0 + timedelta(hours=1))
    for m in held:
        s.message(run, m, channel=None, variant="holdout", state="skipped", at=T0 + timedelta(hours=1))
    pre_total = {}
    for k, m in enumerate(treated + held):
        spend = int(rng.integers(1, 20)) * 1_000
        pre_total[m] = spend
        s.order(m, T0 - timedelta(days=10 + k % 30), total=spend)  # inside a 60-day pre-period
        s.order(m, T0 - timedelta(days=200), total=50_000)  # before it: not a covariate
        bump = 2_000 if m in treated else 0
        s.order(m, T0 + timedelta(days=2), total=spend + bump + int(rng.integers(0, 500)))
    opts = dict(since=T0 - timedelta(days=1), until=T0 + timedelta(days=8), timezone="Asia/Taipei",
                min_buyers_for_retention=1)
    (h,) = build_report(engine, ReportOptions(**opts, cuped=True, cuped_pre_days=60)).holdouts
    rev = next(c for c in h.cuped if c.metric == "revenue")
    base = h.checks.metric("revenue")
    assert rev.unadjusted_difference == pytest.approx(base.difference)
    assert rev.unadjusted_interval == pytest.approx(base.interval)
    mean_t = sum(pre_total[m] for m in treated) / 20
    mean_c = sum(pre_total[m] for m in held) / 20
    assert (rev.covariate_treated, rev.covariate_control) == pytest.approx((mean_t, mean_c))
    assert rev.theta == pytest.approx(1.0, abs=0.05) and rev.correlation > 0.99
    assert rev.variance_reduction > 0.95
    assert rev.difference == pytest.approx(2_000 + 0, abs=200)
    assert rev.interval[1] - rev.interval[0] < 0.25 * (rev.unadjusted_interval[1] - rev.unadjusted_interval[0])
    conv = next(c for c in h.cuped if c.metric == "conversion")
    assert conv.unadjusted_difference == 0.0 and conv.covariate_treated == conv.covariate_control == 1.0
    # Without the option: no CUPED figures. The text report shows them beside the unadjusted interval.
    (plain,) = build_report(engine, ReportOptions(**opts, refresh=False)).holdouts
    assert plain.cuped == []
    from rich.console import Console

    from membercare.reports.html import render_html

    rep = build_report(engine, ReportOptions(**opts, refresh=False, cuped=True, cuped_pre_days=60))
    console = Console(record=True, width=250)
    print_experiments(console, rep)
    out = console.export_text()
    assert "CUPED" in out and "variance reduction" in out and "pre-period spend" in out
    page = render_html(rep)
    assert "CUPED interval" in page and "60 days before the run" in page
    assert rep.to_dict()["holdouts"][0]["cuped"][1]["metric"] == "revenue"
