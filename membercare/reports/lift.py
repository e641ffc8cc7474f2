"""Lift: treated against untreated members, per campaign (its holdout) and for the whole programme (the global
control group). Lift with :mod:`membercare.optimise.lift` (Newcombe interval for rates, Welch for revenue per
member).

* **Holdout vs treated**: intent to treat. Every row of a campaign with a holdout is in an arm (holdout rows vs
  all others, sent or not; global-control rows in neither); the outcomes are a visit (a click or push tap of the
  member, on any message or none), a purchase, and the purchases' revenue within the attribution window after
  the row's ``scheduled_at``.
* **Programme lift**: members with marketing rows vs the global control group (``global_control`` rows),
  purchases from the member's first row of the period to ``until``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.db import is_sqlite
from membercare.delivery.planner import GLOBAL_CONTROL, HOLDOUT
from membercare.engagement.attribution import within_window
from membercare.models import PURCHASE_STATUSES, Order
from membercare.optimise.lift import BinaryLift, MeanLift, MeanSummary, binary_lift, mean_lift
from membercare.reports.checks import (
    DEFAULT_PRIMARY,
    METRICS,
    ArmCheck,
    ExperimentChecks,
    arm_checks,
    experiment_checks,
    per_member_sums,
)
from membercare.reports.cltv import ArmValue, audience_values
from membercare.reports.cuped import CupedCheck, cuped_checks
from membercare.reports.options import ReportOptions
from membercare.reports.sql import CONTROLS, OB, VISITED, E, flag, scope, sum_if
from membercare.reports.stats import ClusterSums, sample_ratio_mismatch


@dataclass
class HoldoutRow:
    campaign: str
    segment: str | None
    treated_n: int
    treated_converters: int
    treated_revenue_minor: int
    holdout_n: int
    holdout_converters: int
    holdout_revenue_minor: int
    conversion: BinaryLift | None  # None when an arm is empty
    revenue: MeanLift | None  # revenue per member (minor units); None when an arm has < 2 members
    treated_visitors: int = 0  # rows whose member visited (a click or push tap) within the window
    holdout_visitors: int = 0
    visit: BinaryLift | None = None  # visit (click) rate lift; None when an arm is empty
    treated_members: int = 0  # distinct members behind the rows (the clusters)
    holdout_members: int = 0
    sample_ratio: list[RunRatio] = field(default_factory=list)  # one check per run of the period
    checks: ExperimentChecks | None = None  # clustered intervals, MDE, primary verdict, Holm-adjusted secondaries
    # With two or more template variants: each variant against the holdout on the primary metric, Holm across arms.
    arms: list[ArmCheck] = field(default_factory=list)
    # With ``--cuped``: conversion and revenue per member adjusted for the pre-period (beside the unadjusted lift).
    cuped: list[CupedCheck] = field(default_factory=list)
    # With ``--cltv``: the arms' lifetime-value distributions (membercare.reports.cltv) and when it was evaluated.
    cltv: list[ArmValue] = field(default_factory=list)
    cltv_note: str = ""

    @property
    def mismatched_runs(self) -> list[RunRatio]:
        return [r for r in self.sample_ratio if r.mismatch]


@dataclass
class RunRatio:
    """The holdout share of one run against the campaign's configured rate (sample-ratio mismatch check)."""

    occurrence: str
    treated: int
    holdout: int
    expected_holdout_share: float
    p_value: float
    mismatch: bool  # p < 0.001: the assignment or the logging is broken for this run


@dataclass
class ProgrammeLift:
    """Everyone the marketing programme selected versus the global control group (no marketing at all)."""

    treated_n: int
    treated_converters: int
    treated_revenue_minor: int
    control_n: int
    control_converters: int
    control_revenue_minor: int
    conversion: BinaryLift | None
    revenue: MeanLift | None
    checks: ExperimentChecks | None = None  # per-member outcomes: clustered = naive up to n / (n - 1)


def _visited(conn: Connection, member_id: Any, start: Any, seconds: int) -> sa.Exists:
    """A visit of the member within ``[start, start + window)``: a click (on any message, or a site visit
    recorded without one) or a push tap. Correlated ``EXISTS`` on the (member_id, occurred_at) index."""
    return sa.exists().where(E.c.member_id == member_id, E.c.kind.in_(VISITED),
                             within_window(conn, E.c.occurred_at, start, seconds))


def _arm_lifts(t: Any, c: Any, options: ReportOptions, successes: str = "converters", *, revenue: bool = True) -> tuple[
        BinaryLift | None, MeanLift | None]:
    """Binary lift of ``successes`` and (with ``revenue``) Welch lift of revenue per member from two arms'
    aggregate rows (``n``, successes, ``revenue``, ``revenue_sq``); None where an arm is too small."""
    tn, cn = (int(t.n) if t else 0), (int(c.n) if c else 0)
    ts, cs = (int(getattr(t, successes)) if t else 0), (int(getattr(c, successes)) if c else 0)
    binary = binary_lift(ts, tn, cs, cn, confidence=options.confidence) if tn and cn else None
    money = None
    if revenue and tn >= 2 and cn >= 2:
        money = mean_lift(MeanSummary.from_sums(tn, _num(t.revenue), _num(t.revenue_sq)),
                          MeanSummary.from_sums(cn, _num(c.revenue), _num(c.revenue_sq)),
                          confidence=options.confidence)
    return binary, money


def _later_occurrence(conn: Connection, options: ReportOptions, order_at: Any) -> sa.Exists:
    """Another row of the same campaign and member, in the period, scheduled after this row and no later than the
    purchase: the purchase belongs to that (later) occurrence, not to this one."""
    later = OB.alias("later_row")
    if is_sqlite(conn):
        after_this = sa.or_(_epoch_ms(later.c.scheduled_at) > _epoch_ms(OB.c.scheduled_at), sa.and_(
            _epoch_ms(later.c.scheduled_at) == _epoch_ms(OB.c.scheduled_at), later.c.id > OB.c.id))
        before_order = _epoch_ms(later.c.scheduled_at) <= _epoch_ms(order_at)
    else:
        after_this = sa.or_(later.c.scheduled_at > OB.c.scheduled_at,
                            sa.and_(later.c.scheduled_at == OB.c.scheduled_at, later.c.id > OB.c.id))
        before_order = later.c.scheduled_at <= order_at
    return sa.exists().where(
        later.c.campaign == OB.c.campaign, later.c.member_id == OB.c.member_id, *scope(options, later),
        sa.or_(later.c.variant.is_(None), later.c.variant != GLOBAL_CONTROL), after_this, before_order)


def holdout_rows(conn: Connection, options: ReportOptions) -> list[HoldoutRow]:
    """Treated vs holdout per campaign with holdout rows (intent to treat; global-control rows are in neither arm).

    A purchase counts for at most one row per campaign and member: the latest row scheduled at or before it (and
    within the window of that row), so overlapping occurrences of a recurring campaign never count it twice.
    Rows are then summed per member (the cluster: a recurring campaign holds out the same members every run)."""
    o = Order.__table__
    seconds = options.attribution.window_seconds
    held = sa.select(OB.c.campaign).where(*scope(options), OB.c.variant == HOLDOUT).distinct()
    in_arms = [*scope(options), OB.c.campaign.in_(held), sa.or_(OB.c.variant.is_(None), OB.c.variant != GLOBAL_CONTROL)]
    is_holdout = sa.case((OB.c.variant == HOLDOUT, 1), else_=0)
    arm = sa.func.coalesce(OB.c.variant, "")
    per_row = sa.select(
        OB.c.id, OB.c.campaign, OB.c.member_id, OB.c.scheduled_at, is_holdout.label("holdout"), arm.label("arm"),
        sa.func.coalesce(sa.func.sum(o.c.total_minor), 0).label("revenue"), sa.func.count(o.c.id).label("orders"),
    ).select_from(OB.outerjoin(o, sa.and_(
        o.c.member_id == OB.c.member_id, o.c.status.in_(PURCHASE_STATUSES),
        within_window(conn, o.c.placed_at, OB.c.scheduled_at, seconds),
        ~_later_occurrence(conn, options, o.c.placed_at),
    ))).where(*in_arms).group_by(OB.c.id, OB.c.campaign, OB.c.member_id, OB.c.scheduled_at, is_holdout,
                                  arm).subquery("per_row")
    values, values_note = audience_values(conn, options, per_row) if options.cltv else ({}, "")
    cuped = (cuped_checks(conn, per_row, sa.select(OB.c.id).where(*in_arms), pre_days=options.cuped_pre_days,
                          confidence=options.confidence) if options.cuped else {})
    arms: dict[str, dict[int, Any]] = {}
    for r in conn.execute(_arm_sums(conn, per_row, seconds, by_variant=False)):
        arms.setdefault(r.campaign, {})[int(r.holdout)] = r
    variant_arms: dict[str, dict[str, Any]] = {}
    if conn.execute(sa.select(OB.c.id).where(*scope(options), OB.c.campaign.in_(held), OB.c.variant.is_not(None),
                                             OB.c.variant.not_in(CONTROLS)).limit(1)).first() is not None:
        for r in conn.execute(_arm_sums(conn, per_row, seconds, by_variant=True)):
            if not int(r.holdout) and r.arm:
                variant_arms.setdefault(r.campaign, {})[r.arm] = r
    srm = run_sample_ratios(conn, options, sorted(arms))
    out = []
    for campaign in sorted(arms):
        t, h = arms[campaign].get(0), arms[campaign].get(1)
        conversion, revenue = _arm_lifts(t, h, options)
        visit, _ = _arm_lifts(t, h, options, "visitors", revenue=False)
        row = HoldoutRow(
            campaign=campaign, segment=options.segments.get(campaign), treated_n=int(t.n) if t else 0,
            treated_converters=int(t.converters) if t else 0, treated_revenue_minor=int(t.revenue) if t else 0,
            holdout_n=int(h.n) if h else 0, holdout_converters=int(h.converters) if h else 0,
            holdout_revenue_minor=int(h.revenue) if h else 0, conversion=conversion, revenue=revenue,
            treated_visitors=int(t.visitors) if t else 0, holdout_visitors=int(h.visitors) if h else 0, visit=visit,
            treated_members=int(t.members) if t else 0, holdout_members=int(h.members) if h else 0,
            sample_ratio=srm.get(campaign, []), cuped=cuped.get(campaign, []), cltv=values.get(campaign, []),
            cltv_note=values_note)
        row.checks = experiment_checks(
            {m: (_cluster_sums(t, m), _cluster_sums(h, m)) for m in METRICS},
            options.primary_metrics.get(campaign, DEFAULT_PRIMARY), options.confidence,
            mismatch=bool(row.mismatched_runs))
        if len(variant_arms.get(campaign, {})) > 1 and h is not None:
            primary = row.checks.primary if row.checks else DEFAULT_PRIMARY
            row.arms = arm_checks({a: (_cluster_sums(r, primary), _cluster_sums(h, primary))
                                   for a, r in sorted(variant_arms[campaign].items())}, primary, options.confidence)
        out.append(row)
    return out


def _arm_sums(conn: Connection, per_row: Any, seconds: int, *, by_variant: bool) -> sa.Select[Any]:
    """Per campaign and arm (treated or holdout, and with ``by_variant`` the template variant): the per-member
    sums of :class:`ClusterSums` for each metric, the number of members and rows, and the rows' revenue squares.
    Members are grouped within the arm, so a member drawn into different variants in different runs is a
    cluster in each."""
    # Squares summed exactly on PostgreSQL (numeric); SQLite has no big integers, so doubles there.
    big = sa.Float if is_sqlite(conn) else sa.Numeric
    row_rev = sa.cast(per_row.c.revenue, big)
    keys = [per_row.c.campaign, per_row.c.holdout] + ([per_row.c.arm] if by_variant else [])
    per_member = sa.select(
        *keys, per_row.c.member_id, sa.func.count().label("m"),
        sum_if(per_row.c.orders > 0).label("conv"),
        sum_if(_visited(conn, per_row.c.member_id, per_row.c.scheduled_at, seconds)).label("vis"),
        sa.func.coalesce(sa.func.sum(row_rev), 0).label("rev"),
        sa.func.coalesce(sa.func.sum(row_rev * row_rev), 0).label("rev_sq"),
    ).group_by(*keys, per_row.c.member_id).subquery("per_member")
    pm = per_member.c
    groups = [pm.campaign, pm.holdout] + ([pm.arm] if by_variant else [])
    cols: list[Any] = [*groups, sa.func.count().label("members"), sa.func.sum(pm.m).label("n"),
                       sa.func.sum(pm.m * pm.m).label("mm"),
                       sa.func.coalesce(sa.func.sum(pm.rev_sq), 0).label("revenue_sq")]
    for name, y in (("converters", pm.conv), ("visitors", pm.vis), ("revenue", pm.rev)):
        yf = sa.cast(y, big)
        cols += [sa.func.coalesce(sa.func.sum(y), 0).label(name),
                 sa.func.coalesce(sa.func.sum(yf * pm.m), 0).label(f"{name}_ym"),
                 sa.func.coalesce(sa.func.sum(yf * yf), 0).label(f"{name}_yy")]
    return sa.select(*cols).group_by(*groups)


def _cluster_sums(arm: Any, metric: str) -> ClusterSums | None:
    """The arm's per-member sums of one metric (``None`` for an empty arm)."""
    if arm is None:
        return None
    y = {"conversion": "converters", "visit": "visitors", "revenue": "revenue"}[metric]
    return ClusterSums(int(arm.members), float(arm.n), float(getattr(arm, y)), float(arm.mm),
                       float(getattr(arm, f"{y}_ym")), float(getattr(arm, f"{y}_yy")))


def run_sample_ratios(conn: Connection, options: ReportOptions, campaigns: list[str]) -> dict[str, list[RunRatio]]:
    """Per campaign and run: holdout rows against the campaign's configured holdout share (``options.holdout_rates``;
    campaigns without one are not checked), chi-square goodness of fit (:func:`sample_ratio_mismatch`)."""
    r = sa.table("campaign_runs", sa.column("id"), sa.column("occurrence"))
    campaigns = [c for c in campaigns if c in options.holdout_rates]
    if not campaigns:
        return {}
    q = sa.select(OB.c.campaign, r.c.occurrence, sum_if(OB.c.variant == HOLDOUT).label("holdout"),
                  sa.func.count().label("rows")).select_from(OB.join(r, r.c.id == OB.c.run_id)).where(
        *scope(options), OB.c.campaign.in_(campaigns), sa.or_(OB.c.variant.is_(None), OB.c.variant != GLOBAL_CONTROL),
    ).group_by(OB.c.campaign, r.c.occurrence).order_by(OB.c.campaign, r.c.occurrence)
    out: dict[str, list[RunRatio]] = {}
    for row in conn.execute(q):
        rate = options.holdout_rates.get(row.campaign)
        held, total = int(row.holdout), int(row.rows)
        if rate is None or not 0.0 < rate < 1.0:
            continue
        check = sample_ratio_mismatch({"holdout": held, "treated": total - held},
                                      {"holdout": rate, "treated": 1.0 - rate})
        out.setdefault(row.campaign, []).append(RunRatio(str(row.occurrence), total - held, held, rate,
                                                         check.p_value, check.mismatch))
    return out


def _num(value: Any) -> int | float:
    """Sums as exact integers where they are (MeanSummary.from_sums then computes the variance exactly)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    return int(value)  # int, or an integral Decimal from PostgreSQL's numeric



def _epoch_ms(col: Any) -> sa.ColumnElement[int]:
    return sa.cast(sa.func.round((sa.func.julianday(col) - 2440587.5) * 86400000.0), sa.BigInteger)


def programme_lift(conn: Connection, options: ReportOptions) -> ProgrammeLift | None:
    """Members with a marketing row in the period, split into the global control group (any
    ``global_control`` row) and everyone else; outcome: purchases from the member's first row of the
    period to ``until``. None when the period has no global-control rows. All campaigns count."""
    period = [OB.c.scheduled_at >= options.since, OB.c.scheduled_at < options.until, OB.c.purpose == "marketing"]
    if conn.execute(sa.select(OB.c.id).where(*period, OB.c.variant == GLOBAL_CONTROL).limit(1)).first() is None:
        return None
    o = Order.__table__
    pm = sa.select(
        OB.c.member_id, flag(OB.c.variant == GLOBAL_CONTROL).label("control"),
        sa.func.min(OB.c.scheduled_at).label("first_at"),
    ).where(*period).group_by(OB.c.member_id).subquery("programme_members")
    # Column against column: SQLite's stored text may mix formats, so compare integer milliseconds there.
    after = (_epoch_ms(o.c.placed_at) >= _epoch_ms(pm.c.first_at)) if is_sqlite(conn) else (
        o.c.placed_at >= pm.c.first_at)
    per_member = sa.select(
        pm.c.member_id, pm.c.control, sa.func.coalesce(sa.func.sum(o.c.total_minor), 0).label("revenue"),
        sa.func.count(o.c.id).label("orders"),
    ).select_from(pm.outerjoin(o, sa.and_(
        o.c.member_id == pm.c.member_id, o.c.status.in_(PURCHASE_STATUSES), after, o.c.placed_at < options.until,
    ))).group_by(pm.c.member_id, pm.c.control).subquery("programme_outcomes")
    big = sa.Float if is_sqlite(conn) else sa.Numeric
    rev = sa.cast(per_member.c.revenue, big)
    arms = {int(r.control): r for r in conn.execute(sa.select(
        per_member.c.control, sa.func.count().label("n"), sum_if(per_member.c.orders > 0).label("converters"),
        sa.func.coalesce(sa.func.sum(per_member.c.revenue), 0).label("revenue"),
        sa.func.coalesce(sa.func.sum(rev * rev), 0).label("revenue_sq"),
    ).group_by(per_member.c.control))}
    t, c = arms.get(0), arms.get(1)
    conversion, revenue = _arm_lifts(t, c, options)
    # One row per member here: the member is already the unit, so clustering changes nothing but CR1's n / (n - 1).
    sums = {"conversion": (_member_sums(t, "converters", "converters"), _member_sums(c, "converters", "converters")),
            "revenue": (_member_sums(t, "revenue", "revenue_sq"), _member_sums(c, "revenue", "revenue_sq"))}
    return ProgrammeLift(
        treated_n=int(t.n) if t else 0, treated_converters=int(t.converters) if t else 0,
        treated_revenue_minor=int(t.revenue) if t else 0, control_n=int(c.n) if c else 0,
        control_converters=int(c.converters) if c else 0, control_revenue_minor=int(c.revenue) if c else 0,
        conversion=conversion, revenue=revenue,
        checks=experiment_checks(sums, DEFAULT_PRIMARY, options.confidence))


def _member_sums(arm: Any, total: str, squares: str) -> ClusterSums | None:
    return per_member_sums(int(arm.n), float(getattr(arm, total)), float(getattr(arm, squares))) if arm else None

