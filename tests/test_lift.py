"""Lift statistics: published reference values, scipy cross-checks and the Hillstrom e-mail experiment."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import relative_risk

from membercare.optimise.lift import (
    MeanSummary,
    binary_lift,
    hillstrom_lift,
    load_hillstrom,
    mean_lift,
    wilson_interval,
)

HILLSTROM = Path(__file__).parent / "fixtures" / "hillstrom" / "hillstrom.csv.zip"


@pytest.fixture(scope="module")
def hillstrom():
    return load_hillstrom(HILLSTROM)


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe, Stat Med 1998;17:857-872 (single proportion), method 3: 81/263 -> 0.2553, 0.3662.
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


@pytest.mark.parametrize(
    "xt,nt,xc,nc,expected",
    [
        # Newcombe, Stat Med 1998;17:873-890, Table II, method 10 (hybrid score, no continuity correction).
        (56, 70, 48, 80, (0.0524, 0.3339)),
        (9, 10, 3, 10, (0.1705, 0.8090)),
    ],
)
def test_newcombe_difference_interval_matches_published_values(xt, nt, xc, nc, expected):
    r = binary_lift(xt, nt, xc, nc)
    assert (round(r.absolute_lift_ci[0], 4), round(r.absolute_lift_ci[1], 4)) == expected


def test_relative_lift_matches_scipy_katz_and_p_value_matches_chi_square():
    r = binary_lift(56, 70, 48, 80)
    ci = relative_risk(56, 70, 48, 80).confidence_interval(0.95)
    assert r.relative_lift == pytest.approx(0.8 / 0.6 - 1)
    assert r.relative_lift_ci == pytest.approx((ci.low - 1, ci.high - 1))
    chi2 = stats.chi2_contingency([[56, 14], [48, 32]], correction=False)
    assert r.p_value == pytest.approx(chi2.pvalue, rel=1e-9)
    assert r.significant


def test_wald_method_and_edge_cases():
    r = binary_lift(30, 100, 20, 100, method="wald")
    se = math.sqrt(0.3 * 0.7 / 100 + 0.2 * 0.8 / 100)
    assert r.absolute_lift_ci == pytest.approx((0.1 - 1.959964 * se, 0.1 + 1.959964 * se), rel=1e-5)
    assert not binary_lift(11, 100, 10, 100).significant
    zero_ctrl = binary_lift(5, 100, 0, 100)
    assert zero_ctrl.relative_lift is None and zero_ctrl.relative_lift_ci is None
    zero_trt = binary_lift(0, 100, 5, 100)
    assert zero_trt.relative_lift == -1.0 and zero_trt.relative_lift_ci[0] > -1.0  # Haldane-corrected interval
    assert binary_lift(0, 50, 0, 50).p_value == 1.0
    with pytest.raises(ValueError):
        binary_lift(5, 4, 1, 10)
    with pytest.raises(ValueError):
        binary_lift(1, 10, 1, 10, method="exact")


def test_welch_matches_scipy_and_sums_match_values():
    rng = np.random.default_rng(7)
    # Zero-inflated revenue in minor units, like real campaign spend.
    t = np.where(rng.random(3000) < 0.05, rng.gamma(2.0, 60_000, 3000), 0).round().astype(np.int64)
    c = np.where(rng.random(2500) < 0.03, rng.gamma(2.0, 60_000, 2500), 0).round().astype(np.int64)
    r = mean_lift(MeanSummary.from_values(t), MeanSummary.from_values(c))
    ref = stats.ttest_ind(t, c, equal_var=False)
    ref_ci = ref.confidence_interval(0.95)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.absolute_lift_ci == pytest.approx((ref_ci.low, ref_ci.high), rel=1e-9)
    assert r.degrees_of_freedom == pytest.approx(ref.df, rel=1e-9)
    s = MeanSummary.from_sums(t.size, int(t.sum()), int((t.astype(object) ** 2).sum()))
    assert s.mean == pytest.approx(t.mean()) and s.variance == pytest.approx(t.var(ddof=1), rel=1e-12)
    assert r.relative_lift == pytest.approx(t.mean() / c.mean() - 1)
    lo, hi = r.relative_lift_ci
    assert lo < r.relative_lift < hi


def test_relative_mean_lift_interval_has_nominal_coverage():
    # The delta-method interval on log(m_t/m_c) should cover the truth ~95 % of the time at campaign sizes.
    rng = np.random.default_rng(11)
    true_ratio = (0.06 * 100.0) / (0.04 * 100.0)
    covered = 0
    for _ in range(400):
        t = np.where(rng.random(4000) < 0.06, rng.exponential(100.0, 4000), 0.0)
        c = np.where(rng.random(4000) < 0.04, rng.exponential(100.0, 4000), 0.0)
        lo, hi = mean_lift(MeanSummary.from_values(t), MeanSummary.from_values(c)).relative_lift_ci
        covered += lo <= true_ratio - 1 <= hi
    assert 0.92 <= covered / 400 <= 0.98


def test_hillstrom_fixture_is_the_full_experiment(hillstrom):
    assert len(hillstrom) == 64_000
    sizes = {arm: int(hillstrom.arm(arm).sum()) for arm in ("Mens E-Mail", "Womens E-Mail", "No E-Mail")}
    assert sizes == {"Mens E-Mail": 21_307, "Womens E-Mail": 21_387, "No E-Mail": 21_306}
    # Whole-file figures published with the data set.
    assert round(hillstrom.visit.mean(), 5) == 0.14678
    assert round(hillstrom.conversion.mean(), 5) == 0.00903
    assert round(hillstrom.spend_minor.mean() / 100, 5) == 1.05091
    first = next(hillstrom.records())
    assert first["customer"] == 1 and first["segment"] == "Womens E-Mail" and first["history_minor"] == 14244


def test_hillstrom_mens_email_lift(hillstrom):
    r = hillstrom_lift(hillstrom, "Mens E-Mail", "No E-Mail")
    visit = r["visit"]
    assert (visit.treated_successes, visit.treated_n) == (3894, 21307)
    assert (visit.control_successes, visit.control_n) == (2262, 21306)
    assert round(100 * visit.absolute_lift, 2) == 7.66
    # Newcombe 95 % interval: +7.00 to +8.32 points; the Wald interval agrees to 0.01 point at this size.
    assert (round(100 * visit.absolute_lift_ci[0], 2), round(100 * visit.absolute_lift_ci[1], 2)) == (7.00, 8.32)
    wald = hillstrom_lift(hillstrom)["visit"]
    assert wald.absolute_lift_ci == pytest.approx(
        binary_lift(3894, 21307, 2262, 21306, method="wald").absolute_lift_ci, abs=1e-4)
    assert round(100 * visit.relative_lift, 1) == 72.1  # 18.28 % vs 10.62 %
    assert visit.significant and visit.p_value < 1e-100

    conv = r["conversion"]
    assert round(100 * conv.absolute_lift, 2) == 0.68
    assert 0.004 < conv.absolute_lift_ci[0] < conv.absolute_lift_ci[1] < 0.009 and conv.significant

    spend = r["spend_minor"]
    assert round(spend.absolute_lift / 100, 2) == 0.77
    mens = hillstrom.spend_minor[hillstrom.arm("Mens E-Mail")]
    none = hillstrom.spend_minor[hillstrom.arm("No E-Mail")]
    ref = stats.ttest_ind(mens, none, equal_var=False)
    assert spend.p_value == pytest.approx(ref.pvalue, rel=1e-6)
    assert spend.absolute_lift_ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-6)
    assert spend.significant


def test_hillstrom_womens_email_lift(hillstrom):
    r = hillstrom_lift(hillstrom, "Womens E-Mail", "No E-Mail")
    assert round(100 * r["visit"].absolute_lift, 2) == 4.52
    assert round(100 * r["conversion"].absolute_lift, 2) == 0.31
    assert round(r["spend_minor"].absolute_lift / 100, 2) == 0.42
    with pytest.raises(ValueError, match="unknown arm"):
        hillstrom.arm("Kids E-Mail")
