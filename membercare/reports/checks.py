"""The decision rules of a lift comparison (treated vs holdout, marketed vs global control), from per-member sums.

* **Member-clustered intervals.** Every interval a verdict rests on is the cluster-robust (members as clusters)
  Wald interval of :func:`membercare.reports.stats.clustered_lift`: a recurring campaign holds out the same
  members in every occurrence, so rows are not independent. With one row per member it equals the naive one
  (up to CR1's ``n / (n - 1)``).
* **A pre-declared primary metric** (``primary_metric`` in campaign.yaml: conversion by default, or visit or
  revenue). The verdict rests on it alone, at ``1 - confidence``; the other metrics are secondary, their
  p-values Holm-adjusted together (:func:`membercare.reports.stats.holm`) and shown plainly as such.
* **Minimum detectable effect** beside each lift: the difference the comparison detects with 80 % power at the
  current sizes (binary metrics: :func:`membercare.reports.stats.minimum_detectable_effect` at the holdout's rate
  with the clustered design effect; revenue: ``(z_(1-alpha/2) + z_0.8)`` times the clustered standard error). When
  it exceeds the observed difference the comparison is underpowered: "no effect shown" is then not evidence of
  no effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from scipy import stats as sps

from membercare.reports.stats import ClusterSums, Interval, clustered_lift, holm, minimum_detectable_effect

METRICS = ("conversion", "visit", "revenue")
PRIMARY_METRICS = frozenset(METRICS)
DEFAULT_PRIMARY = "conversion"
POWER = 0.8
BINARY = frozenset({"conversion", "visit"})


@dataclass
class MetricCheck:
    """One metric of a comparison: the difference (treated minus control) with its member-clustered interval."""

    metric: str
    role: str  # "primary" or "secondary"
    difference: float
    interval: Interval  # member-clustered, at the report's confidence
    naive_interval: Interval | None  # rows taken as independent (binary metrics only), for comparison
    design_effect: float  # clustered variance / naive variance (binary metrics), nan for revenue
    p_value: float  # two-sided, clustered standard error
    adjusted_p: float  # Holm-adjusted among the secondary metrics; the raw p-value for the primary one
    significant: bool  # adjusted_p < alpha
    mde: float  # minimum detectable effect (absolute, same unit as the difference), 80 % power
    underpowered: bool  # mde > |difference|


@dataclass
class ExperimentChecks:
    primary: str
    alpha: float
    verdict: str  # "works", "hurts", "no effect shown", or "not trustworthy: ..."
    metrics: list[MetricCheck] = field(default_factory=list)

    def metric(self, name: str) -> MetricCheck | None:
        return next((m for m in self.metrics if m.metric == name), None)


def _z(confidence: float) -> float:
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


def _check(metric: str, t: ClusterSums, c: ClusterSums, confidence: float) -> MetricCheck | None:
    alpha = 1.0 - confidence
    if t.m <= 0 or c.m <= 0 or t.n < 2 or c.n < 2:
        return None
    if metric in BINARY:
        lift = clustered_lift(t, c, confidence)
        d, interval, p, deff = lift.difference, lift.clustered_interval, lift.p_value, lift.design_effect
        naive: Interval | None = lift.naive_interval
        base = c.rate if 0.0 < c.rate < 1.0 else (t.y + c.y) / (t.m + c.m)
        mde = (minimum_detectable_effect(int(t.m), int(c.m), base, alpha=alpha, power=POWER,
                                         design_effect=deff if deff > 0 else 1.0)
               if 0.0 < base < 1.0 and math.isfinite(deff) else math.nan)
    else:
        d = t.rate - c.rate
        se = math.sqrt(t.clustered_variance() + c.clustered_variance())
        z = _z(confidence)
        interval, naive, deff = (d - z * se, d + z * se), None, math.nan
        p = 2.0 * float(sps.norm.sf(abs(d) / se)) if se > 0 else math.nan
        mde = (_z(1.0 - alpha) + float(sps.norm.ppf(POWER))) * se
    return MetricCheck(metric, "secondary", d, interval, naive, deff, p, p, False, mde,
                       bool(math.isfinite(mde) and mde > abs(d)))


def experiment_checks(sums: Mapping[str, tuple[ClusterSums | None, ClusterSums | None]], primary: str,
                      confidence: float, *, mismatch: bool = False) -> ExperimentChecks | None:
    """Clustered intervals, MDE, the primary verdict and Holm-adjusted secondary metrics of one comparison.
    ``sums`` maps a metric to (treated, control) per-member sums; ``mismatch``: a sample-ratio mismatch was found
    (the verdict then says not to trust the comparison). None when an arm has fewer than two members."""
    alpha = 1.0 - confidence
    checks = {}
    for metric, (t, c) in sums.items():
        one = _check(metric, t, c, confidence) if t is not None and c is not None else None
        if one is not None:
            checks[metric] = one
    if not checks:
        return None
    if primary not in checks:
        primary = DEFAULT_PRIMARY if DEFAULT_PRIMARY in checks else next(iter(checks))
    first = checks[primary]
    first.role, first.significant = "primary", bool(first.p_value < alpha)
    secondary = {m: c.p_value for m, c in checks.items() if m != primary and not math.isnan(c.p_value)}
    if secondary:
        for res in holm(secondary, alpha=alpha):
            checks[res.name].adjusted_p, checks[res.name].significant = res.adjusted, res.adjusted < alpha
    if mismatch:
        verdict = "not trustworthy: sample ratio mismatch"
    elif first.significant:
        verdict = "works" if first.difference > 0 else "hurts"
    else:
        verdict = "no effect shown" + (" (underpowered)" if first.underpowered else "")
    ordered = [first] + [c for m, c in checks.items() if m != primary]
    return ExperimentChecks(primary, alpha, verdict, ordered)


@dataclass
class ArmCheck:
    """One template variant against the holdout on the campaign's primary metric (Holm-adjusted across arms)."""

    arm: str
    check: MetricCheck


def arm_checks(sums: Mapping[str, tuple[ClusterSums | None, ClusterSums | None]], metric: str,
               confidence: float) -> list[ArmCheck]:
    """Several arms against one control: each arm's clustered difference on ``metric``, p-values Holm-adjusted
    across the arms (valid under any dependence, so also for the shared control; Dunnett would be a little
    more powerful)."""
    out = []
    for arm, (t, c) in sums.items():
        one = _check(metric, t, c, confidence) if t is not None and c is not None else None
        if one is not None:
            one.role = "arm vs holdout"
            out.append(ArmCheck(arm, one))
    ps = {a.arm: a.check.p_value for a in out if not math.isnan(a.check.p_value)}
    if ps:
        adjusted = {r.name: r for r in holm(ps, alpha=1.0 - confidence)}
        for a in out:
            if a.arm in adjusted:
                a.check.adjusted_p = adjusted[a.arm].adjusted
                a.check.significant = a.check.adjusted_p < 1.0 - confidence
    return out


def per_member_sums(members: int, successes: float, squares: float) -> ClusterSums:
    """Sums of a comparison whose unit is already the member (one row each): ``m_i = 1``."""
    return ClusterSums(members, float(members), float(successes), float(members), float(successes), float(squares))


__all__ = ["DEFAULT_PRIMARY", "METRICS", "PRIMARY_METRICS", "ArmCheck", "ExperimentChecks", "MetricCheck",
           "arm_checks", "experiment_checks", "per_member_sums"]
