"""Campaign reports computed with SQL aggregates: funnel, holdout lift, variant tests, frequency evidence,
programme lift, shop KPIs and trends.

Nothing here loads events or orders into Python: every figure is a ``GROUP BY`` in the database, and
Python only shapes the (few) result rows and runs the lift statistics on their sums. The definitions
are in ``docs/reports.md``; the headline ones:

* **Funnel** per campaign x segment x channel, over the outbox rows scheduled in ``[since, until)``
  (holdout rows excluded: they are the holdout section). ``planned`` = ledger rows (every member the
  segment selected and did not hold out, including those skipped with a reason), ``sent`` = state
  ``sent``; ``delivered``/``opened``/``clicked`` = messages with at least one such event, where a later
  stage implies the earlier ones (a click proves an open that a privacy proxy may have hidden); push
  taps count as opens. ``converted`` = messages credited with at least one order by the attribution
  model, ``revenue`` = the credited orders' totals; ``unsubscribed`` = messages followed by an
  unsubscribe or spam complaint: carrying the message id, or, for opt-outs that carry none (SMS STOP
  replies, one-click unsubscribes), the member's latest message sent on that channel within the
  attribution window before it. SMS segments are summed over sent SMS; cost = segments x price.
* **Holdout vs treated**: intent to treat. Every row of a campaign with a holdout is in an arm (holdout
  rows vs all others, sent or not; global-control rows in neither); the outcomes are a visit (a click or
  push tap of the member, on any message or none), a purchase, and the purchases' revenue within the
  attribution window after the row's ``scheduled_at``. Lift with :mod:`membercare.optimise.lift` (Newcombe
  interval for rates, Welch for revenue per member).
* **Programme lift**: members with marketing rows vs the global control group (``global_control`` rows),
  purchases from the member's first row of the period to ``until``.
* **Variants**: per campaign with template variants, sends, clicks and credited conversions per variant,
  Beta posteriors on the goal, P(best), realised and next shares (:mod:`membercare.optimise.bandit`).
* **Frequency**: member-weeks by marketing messages received, with the weeks' unsubscribe and complaint
  rates (Wilson intervals) and the highest weekly count the evidence allows
  (:mod:`membercare.optimise.frequency`).
* **KPIs** as of ``until`` over the trailing ``active_days`` (365): active members (at least one purchase),
  repurchase rate (buyers with two or more purchases / buyers), average order value, purchase frequency,
  members by tier, and an estimated customer lifetime value
  ``AOV x purchases per buyer per year x expected lifetime``, where the expected lifetime is
  ``1 / (1 - retention)`` years from the year-over-year buyer retention (capped; an assumed default when
  the previous year has too few buyers). When BG/NBD churn scores exist, their mean expected purchases
  over the fit's horizon x AOV is shown too.
* **Trends** per day or ISO week in the shop's timezone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import is_sqlite
from membercare.delivery.models import OutboxMessage, OutboxState
from membercare.delivery.planner import GLOBAL_CONTROL, HOLDOUT
from membercare.engagement.attribution import (
    AttributionResult,
    AttributionSettings,
    compute_attributions,
    within_window,
)
from membercare.engagement.attribution_models import Attribution, ConversionType, SmsMessageSegments
from membercare.engagement.events import EventKind, InboundCommand
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import PURCHASE_STATUSES, Member, Order, Tier
from membercare.optimise import bandit
from membercare.optimise.frequency import FrequencyBucket, frequency_table_from_counts, highest_safe_frequency
from membercare.optimise.lift import BinaryLift, MeanLift, MeanSummary, binary_lift, mean_lift
from membercare.timeutil import ensure_utc, utcnow

Granularity = Literal["day", "week"]
OB, E, A = OutboxMessage.__table__, EngagementEventRow.__table__, Attribution.__table__
NO_CHANNEL = "-"  # funnel rows of members who got no channel (skipped before routing chose one)

_DELIVERED = (EventKind.DELIVERED.value, EventKind.PUSH_RECEIVED.value)
_OPENED = (EventKind.OPENED.value, EventKind.PUSH_OPENED.value)
_CLICKED = (EventKind.CLICKED.value,)
_OPTED_OUT = (EventKind.UNSUBSCRIBED.value, EventKind.COMPLAINED.value)
# A visit: the member followed a link (any message, or a site visit recorded without one) or tapped a push.
_VISITED = (EventKind.CLICKED.value, EventKind.PUSH_OPENED.value)
_CONTROLS = (HOLDOUT, GLOBAL_CONTROL)


@dataclass(frozen=True)
class ReportOptions:
    """What to report on. ``segments`` maps a campaign to its segment name (from its definition)."""

    since: datetime
    until: datetime
    campaign: str | None = None
    granularity: Granularity = "day"
    timezone: str = "Asia/Taipei"
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    sms_price_minor: int = 0
    currency: str = "TWD"
    segments: Mapping[str, str] = field(default_factory=dict)
    refresh: bool = True  # recompute attributions and the SMS segment cache first
    active_days: int = 365
    default_lifetime_years: float = 3.0
    max_lifetime_years: float = 10.0
    min_buyers_for_retention: int = 30
    confidence: float = 0.95
    # Variant tests: campaign -> {"goal": "click"|"conversion", "floor": f, "promote_at": p} (campaign.yaml's
    # optimise.variants); campaigns not listed use the bandit's defaults (click, 5 %, 0.95).
    variant_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Frequency section: the ceilings of the weekly unsubscribe and complaint rates (per member-week) under
    # which a weekly message count counts as safe, and the buckets' lower edges.
    max_unsubscribe_rate: float = 0.005
    max_complaint_rate: float | None = 0.001
    frequency_edges: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    min_member_weeks: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", ensure_utc(self.since))
        object.__setattr__(self, "until", ensure_utc(self.until))
        if self.until <= self.since:
            raise InputError("--until must be after --since")
        if self.granularity not in ("day", "week"):
            raise InputError("granularity must be day or week")
        ZoneInfo(self.timezone)


@dataclass
class FunnelRow:
    campaign: str
    segment: str | None
    channel: str
    planned: int = 0
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    converted: int = 0  # messages credited with at least one order
    orders: int = 0
    revenue_minor: int = 0
    coupons: int = 0  # credited coupon redemptions
    unsubscribed: int = 0
    sms_segments: int = 0
    sms_cost_minor: int = 0

    def rate(self, numerator: str, denominator: str = "sent") -> float | None:
        d = getattr(self, denominator)
        return getattr(self, numerator) / d if d else None

    def add(self, other: FunnelRow) -> None:
        for name in ("planned", "sent", "delivered", "opened", "clicked", "converted", "orders", "revenue_minor",
                     "coupons", "unsubscribed", "sms_segments", "sms_cost_minor"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


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


@dataclass
class VariantRow:
    """One variant of a campaign's A/B/n test over the period: results, posterior and shares."""

    name: str
    rows: int  # outbox rows assigned this variant (sent or not)
    sends: int
    clicks: int  # sent messages with a click (or push tap)
    conversions: int  # sent messages credited with an order by the attribution model
    revenue_minor: int
    posterior_alpha: float
    posterior_beta: float
    posterior_mean: float
    credible_interval: tuple[float, float]
    p_best: float
    next_share: float  # the bandit's share for the next run (floor applied; 1/0 after promotion)
    latest_share: float | None  # realised share of rows in the campaign's latest run of the period
    planned_share: float | None = None  # the share planning recorded for that run (variant_allocations)


@dataclass
class VariantSection:
    campaign: str
    goal: str
    floor: float
    promote_at: float
    latest_occurrence: str | None
    winner: str | None  # P(best) >= promote_at with enough sends: the bandit promotes it
    promoted: str | None  # the winner planning recorded for the latest run (variant_allocations)
    variants: list[VariantRow]
    notes: list[str] = field(default_factory=list)
    plan_reason: str | None = None  # how planning decided the latest run's shares (uniform, bandit, promoted)


@dataclass
class FrequencySection:
    """Weekly unsubscribe and complaint rates against marketing messages received per member that week."""

    buckets: list[FrequencyBucket]
    max_unsubscribe_rate: float
    max_complaint_rate: float | None
    min_member_weeks: int
    highest_safe: int | None  # the highest weekly message count whose evidence stays under the ceilings
    member_weeks: int
    messages: int


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


@dataclass
class Kpis:
    as_of: datetime
    window_days: int
    members_total: int
    members_by_tier: dict[str, int]
    new_members: int  # joined in [since, until)
    active_members: int
    buyers: int
    orders: int
    revenue_minor: int
    aov_minor: float | None
    repurchase_rate: float | None
    purchases_per_buyer_per_year: float | None
    retention_rate: float | None
    expected_lifetime_years: float | None
    lifetime_assumed: bool
    clv_minor: float | None
    period_orders: int
    period_revenue_minor: int
    bgnbd: dict[str, Any] | None = None


@dataclass
class TrendPoint:
    bucket: date
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    unsubscribed: int = 0
    conversions: int = 0
    revenue_minor: int = 0


@dataclass
class Report:
    options: ReportOptions
    generated_at: datetime
    funnel: list[FunnelRow]
    totals: FunnelRow
    holdouts: list[HoldoutRow]
    kpis: Kpis
    trends: list[TrendPoint]
    attribution: AttributionResult | None = None
    variants: list[VariantSection] = field(default_factory=list)
    frequency: FrequencySection | None = None
    programme: ProgrammeLift | None = None

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return _jsonable({
            "since": o.since, "until": o.until, "campaign": o.campaign, "granularity": o.granularity,
            "timezone": o.timezone, "currency": o.currency, "generated_at": self.generated_at,
            "attribution": {"model": o.attribution.model.value, "window_seconds": o.attribution.window_seconds,
                            "touch": {k: v.value for k, v in o.attribution.touch.items()}},
            "funnel": [asdict(r) for r in self.funnel], "totals": asdict(self.totals),
            "holdouts": [asdict(h) for h in self.holdouts], "kpis": asdict(self.kpis),
            "trends": [asdict(t) for t in self.trends],
            "variants": [asdict(v) for v in self.variants],
            "frequency": asdict(self.frequency) if self.frequency else None,
            "programme": asdict(self.programme) if self.programme else None,
        })


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def build_report(engine: Engine, options: ReportOptions) -> Report:
    """Refresh the derived tables (unless ``options.refresh`` is off) and compute every section."""
    attribution = None
    if options.refresh:
        from membercare.reports.sms import refresh_sms_segments

        # Conversions up to one window after the range can still be credited to its messages.
        end = min(options.until + options.attribution.window, max(utcnow(), options.until))
        attribution = compute_attributions(engine, options.since, end, options.attribution)
        refresh_sms_segments(engine)
    with engine.connect() as conn:
        funnel = funnel_rows(conn, options)
        totals = FunnelRow(campaign="all", segment=None, channel="all")
        for row in funnel:
            totals.add(row)
        return Report(options=options, generated_at=utcnow(), funnel=funnel, totals=totals,
                      holdouts=holdout_rows(conn, options), kpis=kpis(conn, options),
                      trends=trends(conn, options), attribution=attribution,
                      variants=variant_sections(conn, options), frequency=frequency_section(conn, options),
                      programme=programme_lift(conn, options))


def _scope(options: ReportOptions, table=OB) -> list:
    cond = [table.c.scheduled_at >= options.since, table.c.scheduled_at < options.until]
    if options.campaign:
        cond.append(table.c.campaign == options.campaign)
    return cond


def _flag(condition) -> sa.ColumnElement:
    return sa.func.max(sa.case((condition, 1), else_=0))


def _sum_if(condition, value=1) -> sa.ColumnElement:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, value), else_=0)), 0)


# ---------------------------------------------------------------------------------------------------------------------
# Funnel


def orphan_optouts(conn: Connection, options: ReportOptions) -> sa.Subquery:
    """Message ids credited with an opt-out that carried no message id (STOP reply, one-click unsubscribe):
    the member's latest message sent on that channel within the attribution window before it."""
    seconds = options.attribution.window_seconds
    optout = sa.or_(E.c.kind == EventKind.UNSUBSCRIBED.value,
                    sa.and_(E.c.kind == EventKind.INBOUND.value, E.c.reason == InboundCommand.STOP.value))
    ranked = sa.select(
        OB.c.message_id,
        sa.func.row_number().over(partition_by=E.c.id, order_by=[OB.c.sent_at.desc(), OB.c.id.desc()]).label("rn"),
    ).select_from(E.join(OB, sa.and_(
        OB.c.member_id == E.c.member_id, OB.c.channel == E.c.channel, OB.c.state == OutboxState.SENT.value,
        OB.c.sent_at.is_not(None), within_window(conn, E.c.occurred_at, OB.c.sent_at, seconds),
    ))).where(
        E.c.message_id.is_(None), E.c.member_id.is_not(None), optout,
        E.c.occurred_at >= options.since, E.c.occurred_at < options.until + options.attribution.window,
        *_scope(options),
    ).subquery("ranked_optouts")
    return sa.select(ranked.c.message_id).where(ranked.c.rn == 1).distinct().subquery("orphan_optouts")


def funnel_rows(conn: Connection, options: ReportOptions) -> list[FunnelRow]:
    model = options.attribution.model.value
    credit = sa.select(
        A.c.message_id,
        _sum_if(A.c.conversion_type == ConversionType.ORDER.value).label("orders"),
        _sum_if(A.c.conversion_type == ConversionType.ORDER.value, A.c.revenue_minor).label("revenue"),
        _sum_if(A.c.conversion_type == ConversionType.COUPON.value).label("coupons"),
    ).where(A.c.model == model).group_by(A.c.message_id).subquery("credit")
    orphans = orphan_optouts(conn, options)
    seg = SmsMessageSegments.__table__
    channel = sa.func.coalesce(OB.c.channel, NO_CHANNEL)
    per_message = sa.select(
        OB.c.id, OB.c.campaign, channel.label("channel"), OB.c.state,
        _flag(E.c.kind.in_(_DELIVERED + _OPENED + _CLICKED)).label("delivered"),
        _flag(E.c.kind.in_(_OPENED + _CLICKED)).label("opened"),
        _flag(E.c.kind.in_(_CLICKED)).label("clicked"),
        _flag(E.c.kind.in_(_OPTED_OUT)).label("opted_out"),
    ).select_from(OB.outerjoin(E, E.c.message_id == OB.c.message_id)).where(
        *_scope(options), sa.or_(OB.c.variant.is_(None), OB.c.variant.not_in(_CONTROLS)),
    ).group_by(OB.c.id, OB.c.campaign, channel, OB.c.state).subquery("per_message")
    pm_outbox = OB.alias("pm_outbox")
    sent = per_message.c.state == OutboxState.SENT.value
    query = sa.select(
        per_message.c.campaign, per_message.c.channel,
        sa.func.count().label("planned"),
        _sum_if(sent).label("sent"),
        sa.func.coalesce(sa.func.sum(per_message.c.delivered), 0).label("delivered"),
        sa.func.coalesce(sa.func.sum(per_message.c.opened), 0).label("opened"),
        sa.func.coalesce(sa.func.sum(per_message.c.clicked), 0).label("clicked"),
        _sum_if(credit.c.orders > 0).label("converted"),
        sa.func.coalesce(sa.func.sum(credit.c.orders), 0).label("orders"),
        sa.func.coalesce(sa.func.sum(credit.c.revenue), 0).label("revenue"),
        sa.func.coalesce(sa.func.sum(credit.c.coupons), 0).label("coupons"),
        _sum_if(sa.or_(per_message.c.opted_out == 1, orphans.c.message_id.is_not(None))).label("unsubscribed"),
        _sum_if(sa.and_(sent, per_message.c.channel == "sms"), sa.func.coalesce(seg.c.segments, 0)).label("segments"),
    ).select_from(
        per_message.join(pm_outbox, pm_outbox.c.id == per_message.c.id)
        .outerjoin(credit, credit.c.message_id == pm_outbox.c.message_id)
        .outerjoin(orphans, orphans.c.message_id == pm_outbox.c.message_id)
        .outerjoin(seg, seg.c.message_id == pm_outbox.c.message_id)
    ).group_by(per_message.c.campaign, per_message.c.channel).order_by(per_message.c.campaign, per_message.c.channel)
    out = []
    for r in conn.execute(query):
        out.append(FunnelRow(
            campaign=r.campaign, segment=options.segments.get(r.campaign), channel=r.channel, planned=int(r.planned),
            sent=int(r.sent), delivered=int(r.delivered), opened=int(r.opened), clicked=int(r.clicked),
            converted=int(r.converted), orders=int(r.orders), revenue_minor=int(r.revenue), coupons=int(r.coupons),
            unsubscribed=int(r.unsubscribed), sms_segments=int(r.segments),
            sms_cost_minor=int(r.segments) * options.sms_price_minor,
        ))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Holdout vs treated


def _visited(conn: Connection, member_id, start, seconds: int) -> sa.Exists:
    """A visit of the member within ``[start, start + window)``: a click (on any message, or a site visit
    recorded without one) or a push tap. Correlated ``EXISTS`` on the (member_id, occurred_at) index."""
    return sa.exists().where(E.c.member_id == member_id, E.c.kind.in_(_VISITED),
                             within_window(conn, E.c.occurred_at, start, seconds))


def _arm_lifts(t, c, options: ReportOptions, successes: str = "converters", *, revenue: bool = True) -> tuple[
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


def holdout_rows(conn: Connection, options: ReportOptions) -> list[HoldoutRow]:
    """Treated vs holdout per campaign with holdout rows (intent to treat; global-control rows are in neither arm)."""
    o = Order.__table__
    seconds = options.attribution.window_seconds
    held = sa.select(OB.c.campaign).where(*_scope(options), OB.c.variant == HOLDOUT).distinct()
    is_holdout = sa.case((OB.c.variant == HOLDOUT, 1), else_=0)
    per_row = sa.select(
        OB.c.id, OB.c.campaign, OB.c.member_id, OB.c.scheduled_at, is_holdout.label("holdout"),
        sa.func.coalesce(sa.func.sum(o.c.total_minor), 0).label("revenue"), sa.func.count(o.c.id).label("orders"),
    ).select_from(OB.outerjoin(o, sa.and_(
        o.c.member_id == OB.c.member_id, o.c.status.in_(PURCHASE_STATUSES),
        within_window(conn, o.c.placed_at, OB.c.scheduled_at, seconds),
    ))).where(
        *_scope(options), OB.c.campaign.in_(held),
        sa.or_(OB.c.variant.is_(None), OB.c.variant != GLOBAL_CONTROL),
    ).group_by(OB.c.id, OB.c.campaign, OB.c.member_id, OB.c.scheduled_at, is_holdout).subquery("per_row")
    # Squares summed exactly on PostgreSQL (numeric); SQLite has no big integers, so doubles there.
    big = sa.Float if is_sqlite(conn) else sa.Numeric
    rev = sa.cast(per_row.c.revenue, big)
    query = sa.select(
        per_row.c.campaign, per_row.c.holdout, sa.func.count().label("n"),
        _sum_if(per_row.c.orders > 0).label("converters"),
        _sum_if(_visited(conn, per_row.c.member_id, per_row.c.scheduled_at, seconds)).label("visitors"),
        sa.func.coalesce(sa.func.sum(per_row.c.revenue), 0).label("revenue"),
        sa.func.coalesce(sa.func.sum(rev * rev), 0).label("revenue_sq"),
    ).group_by(per_row.c.campaign, per_row.c.holdout)
    arms: dict[str, dict[int, Any]] = {}
    for r in conn.execute(query):
        arms.setdefault(r.campaign, {})[int(r.holdout)] = r
    out = []
    for campaign in sorted(arms):
        t, h = arms[campaign].get(0), arms[campaign].get(1)
        conversion, revenue = _arm_lifts(t, h, options)
        visit, _ = _arm_lifts(t, h, options, "visitors", revenue=False)
        out.append(HoldoutRow(
            campaign=campaign, segment=options.segments.get(campaign), treated_n=int(t.n) if t else 0,
            treated_converters=int(t.converters) if t else 0, treated_revenue_minor=int(t.revenue) if t else 0,
            holdout_n=int(h.n) if h else 0, holdout_converters=int(h.converters) if h else 0,
            holdout_revenue_minor=int(h.revenue) if h else 0, conversion=conversion, revenue=revenue,
            treated_visitors=int(t.visitors) if t else 0, holdout_visitors=int(h.visitors) if h else 0, visit=visit))
    return out


def _num(value):
    """Sums as exact integers where they are (MeanSummary.from_sums then computes the variance exactly)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    return int(value)  # int, or an integral Decimal from PostgreSQL's numeric


# ---------------------------------------------------------------------------------------------------------------------
# Variants (A/B/n tests)


def variant_settings_from_campaigns(campaigns) -> dict[str, dict[str, Any]]:
    """``ReportOptions.variant_settings`` from campaign definitions (their ``optimise.variants`` blocks)."""
    out = {}
    for c in campaigns:
        test = getattr(getattr(c, "optimise", None), "variants", None)
        if test is not None:
            out[c.name] = {"names": list(test.names), "goal": test.goal, "floor": test.floor,
                           "promote_at": test.promote_at}
    return out


def _recorded_allocations(conn: Connection, campaigns: list[str]) -> dict[tuple[str, str], Any]:
    """What planning recorded per occurrence (``variant_allocations``, written by
    :mod:`membercare.optimise.variants`): shares, promoted winner and why. Empty when the table is absent."""
    if "variant_allocations" not in set(sa.inspect(conn).get_table_names()):
        return {}
    va = sa.table("variant_allocations", sa.column("campaign"), sa.column("occurrence"), sa.column("shares"),
                  sa.column("winner"), sa.column("reason"))
    return {(r.campaign, r.occurrence): r for r in conn.execute(
        sa.select(va.c.campaign, va.c.occurrence, va.c.shares, va.c.winner, va.c.reason).where(
            va.c.campaign.in_(campaigns)))}


def _shares(text: str | None) -> dict[str, float]:
    import json

    try:
        data = json.loads(text or "{}")
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (TypeError, ValueError):
        return {}


def variant_sections(conn: Connection, options: ReportOptions) -> list[VariantSection]:
    """Per campaign with template variants in the period: sends, clicks and credited conversions per variant
    (SQL), each variant's Beta posterior on the campaign's goal, P(best) and the bandit's next shares
    (:func:`membercare.optimise.bandit.allocate`), and the realised shares of the latest run."""
    r = sa.table("campaign_runs", sa.column("id"), sa.column("occurrence"))
    credit = sa.select(
        A.c.message_id, sa.func.count().label("orders"), sa.func.sum(A.c.revenue_minor).label("revenue"),
    ).where(A.c.model == options.attribution.model.value, A.c.conversion_type == ConversionType.ORDER.value
            ).group_by(A.c.message_id).subquery("variant_credit")
    sent = OB.c.state == OutboxState.SENT.value
    clicked = sa.exists().where(E.c.message_id == OB.c.message_id, E.c.kind.in_(_VISITED))
    is_variant = [OB.c.variant.is_not(None), OB.c.variant.not_in(_CONTROLS)]
    query = sa.select(
        OB.c.campaign, OB.c.variant, sa.func.count().label("rows"), _sum_if(sent).label("sends"),
        _sum_if(sa.and_(sent, clicked)).label("clicks"),
        _sum_if(sa.and_(sent, credit.c.orders > 0)).label("conversions"),
        sa.func.coalesce(sa.func.sum(credit.c.revenue), 0).label("revenue"),
    ).select_from(OB.outerjoin(credit, credit.c.message_id == OB.c.message_id)).where(
        *_scope(options), *is_variant).group_by(OB.c.campaign, OB.c.variant)
    per_campaign: dict[str, dict[str, Any]] = {}
    for row in conn.execute(query):
        per_campaign.setdefault(row.campaign, {})[row.variant] = row
    if not per_campaign:
        return []
    latest_ids = sa.select(OB.c.campaign, sa.func.max(OB.c.run_id).label("run_id")).where(
        *_scope(options), *is_variant).group_by(OB.c.campaign).subquery("latest_run")
    latest: dict[str, dict[str, Any]] = {}
    for row in conn.execute(
        sa.select(latest_ids.c.campaign, r.c.occurrence, OB.c.variant, sa.func.count().label("n"))
        .select_from(latest_ids.join(r, r.c.id == latest_ids.c.run_id).join(OB, OB.c.run_id == latest_ids.c.run_id))
        .where(*is_variant).group_by(latest_ids.c.campaign, r.c.occurrence, OB.c.variant)
    ):
        info = latest.setdefault(row.campaign, {"occurrence": row.occurrence, "rows": {}})
        info["rows"][row.variant] = int(row.n)
    recorded = _recorded_allocations(conn, sorted(per_campaign))

    out = []
    for campaign in sorted(per_campaign):
        found = per_campaign[campaign]
        conf = dict(options.variant_settings.get(campaign) or {})
        goal = conf.get("goal", "click")
        configured = [n for n in conf.get("names", ()) if n in found]
        names = configured + sorted(n for n in found if n not in configured)
        successes = "clicks" if goal == "click" else "conversions"
        stats_ = [bandit.VariantStats(n, int(found[n].sends), int(getattr(found[n], successes))) for n in names]
        floor = min(float(conf.get("floor", bandit.DEFAULT_FLOOR)), 1.0 / len(names))
        threshold = float(conf.get("promote_at", bandit.DEFAULT_THRESHOLD))
        alloc = bandit.allocate(stats_, goal=goal, floor=floor, threshold=threshold,
                                seed=bandit.seed_for(campaign, f"report:{options.until.isoformat()}"),
                                confidence=options.confidence)
        info = latest.get(campaign, {"occurrence": None, "rows": {}})
        total = sum(info["rows"].values())
        plan = recorded.get((campaign, info["occurrence"]))
        planned = _shares(plan.shares) if plan is not None else {}
        rows = []
        for v in alloc.variants:
            f = found[v.name]
            rows.append(VariantRow(
                name=v.name, rows=int(f.rows), sends=int(f.sends), clicks=int(f.clicks), conversions=int(f.conversions),
                revenue_minor=int(f.revenue), posterior_alpha=v.posterior_alpha, posterior_beta=v.posterior_beta,
                posterior_mean=v.posterior_mean, credible_interval=v.credible_interval, p_best=v.p_best,
                next_share=v.share, latest_share=info["rows"].get(v.name, 0) / total if total else None,
                planned_share=planned.get(v.name)))
        out.append(VariantSection(campaign=campaign, goal=goal, floor=floor, promote_at=threshold,
                                  latest_occurrence=info["occurrence"], winner=alloc.winner if len(names) > 1 else None,
                                  promoted=plan.winner if plan is not None else None,
                                  plan_reason=plan.reason if plan is not None else None,
                                  variants=rows, notes=list(alloc.notes)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Frequency: opt-out rates against messages received per member-week


def frequency_section(conn: Connection, options: ReportOptions) -> FrequencySection:
    """Member-weeks (ISO weeks in the shop's timezone) with at least one marketing message sent, grouped by the
    number of messages, with the member-weeks that had an unsubscribe (or STOP) and a spam complaint.

    All campaigns count (the frequency cap is cross-campaign), whatever ``options.campaign``.
    """
    from dataclasses import replace

    weekly = replace(options, granularity="week")
    week_o = bucket_expr(conn, OB.c.sent_at, weekly)
    mw = sa.select(OB.c.member_id, week_o.label("week"), sa.func.count().label("messages")).where(
        OB.c.state == OutboxState.SENT.value, OB.c.purpose == "marketing",
        OB.c.sent_at >= options.since, OB.c.sent_at < options.until,
    ).group_by(OB.c.member_id, week_o).subquery("member_weeks")
    week_e = bucket_expr(conn, E.c.occurred_at, weekly)
    unsub = sa.or_(E.c.kind == EventKind.UNSUBSCRIBED.value,
                   sa.and_(E.c.kind == EventKind.INBOUND.value, E.c.reason == InboundCommand.STOP.value))
    complaint = E.c.kind == EventKind.COMPLAINED.value
    opt = sa.select(E.c.member_id, week_e.label("week"), _flag(unsub).label("unsub"),
                    _flag(complaint).label("complaint")).where(
        E.c.member_id.is_not(None), sa.or_(unsub, complaint),
        E.c.occurred_at >= options.since, E.c.occurred_at < options.until,
    ).group_by(E.c.member_id, week_e).subquery("optouts")
    query = sa.select(
        mw.c.messages, sa.func.count().label("member_weeks"),
        sa.func.coalesce(sa.func.sum(opt.c.unsub), 0).label("unsubscribes"),
        sa.func.coalesce(sa.func.sum(opt.c.complaint), 0).label("complaints"),
    ).select_from(mw.outerjoin(opt, sa.and_(opt.c.member_id == mw.c.member_id, opt.c.week == mw.c.week))
                  ).group_by(mw.c.messages)
    counts = [(int(m), int(n), int(u), int(c)) for m, n, u, c in conn.execute(query)]
    buckets = frequency_table_from_counts(counts, edges=options.frequency_edges, confidence=options.confidence)
    safe = highest_safe_frequency(buckets, max_unsubscribe_rate=options.max_unsubscribe_rate,
                                  max_complaint_rate=options.max_complaint_rate,
                                  min_member_weeks=options.min_member_weeks)
    return FrequencySection(buckets=buckets, max_unsubscribe_rate=options.max_unsubscribe_rate,
                            max_complaint_rate=options.max_complaint_rate, min_member_weeks=options.min_member_weeks,
                            highest_safe=safe, member_weeks=sum(b.member_weeks for b in buckets),
                            messages=sum(b.messages for b in buckets))


# ---------------------------------------------------------------------------------------------------------------------
# Programme lift: marketing versus the global control group


def _epoch_ms(col):
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
        OB.c.member_id, _flag(OB.c.variant == GLOBAL_CONTROL).label("control"),
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
        per_member.c.control, sa.func.count().label("n"), _sum_if(per_member.c.orders > 0).label("converters"),
        sa.func.coalesce(sa.func.sum(per_member.c.revenue), 0).label("revenue"),
        sa.func.coalesce(sa.func.sum(rev * rev), 0).label("revenue_sq"),
    ).group_by(per_member.c.control))}
    t, c = arms.get(0), arms.get(1)
    conversion, revenue = _arm_lifts(t, c, options)
    return ProgrammeLift(
        treated_n=int(t.n) if t else 0, treated_converters=int(t.converters) if t else 0,
        treated_revenue_minor=int(t.revenue) if t else 0, control_n=int(c.n) if c else 0,
        control_converters=int(c.converters) if c else 0, control_revenue_minor=int(c.revenue) if c else 0,
        conversion=conversion, revenue=revenue)


# ---------------------------------------------------------------------------------------------------------------------
# KPIs


def kpis(conn: Connection, options: ReportOptions) -> Kpis:
    m, o, t = Member.__table__, Order.__table__, Tier.__table__
    until = options.until
    year = timedelta(days=options.active_days)
    start, prev = until - year, until - 2 * year
    purchase = o.c.status.in_(PURCHASE_STATUSES)

    members_total = conn.execute(sa.select(sa.func.count()).select_from(m).where(m.c.joined_at < until)).scalar_one()
    new_members = conn.execute(sa.select(sa.func.count()).select_from(m).where(
        m.c.joined_at >= options.since, m.c.joined_at < until)).scalar_one()
    by_tier_rows = conn.execute(
        sa.select(m.c.tier, sa.func.count(), sa.func.min(t.c.rank)).select_from(m.outerjoin(t, t.c.code == m.c.tier))
        .where(m.c.joined_at < until).group_by(m.c.tier)
    ).all()
    by_tier = {tier: int(n) for tier, n, _ in sorted(by_tier_rows, key=lambda r: (r[2] is None, r[2] or 0, r[0]))}

    per_buyer = sa.select(o.c.member_id, sa.func.count().label("n"), sa.func.sum(o.c.total_minor).label("spend")).where(
        purchase, o.c.placed_at >= start, o.c.placed_at < until).group_by(o.c.member_id).subquery("per_buyer")
    buyers, orders, revenue, repeaters = conn.execute(sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(per_buyer.c.n), 0),
        sa.func.coalesce(sa.func.sum(per_buyer.c.spend), 0), _sum_if(per_buyer.c.n >= 2),
    )).one()
    buyers, orders, revenue, repeaters = int(buyers), int(orders), int(revenue), int(repeaters)

    prior, retained = _retention(conn, o, purchase, prev, start, until)

    period_orders, period_revenue = conn.execute(sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.total_minor), 0)
    ).where(purchase, o.c.placed_at >= options.since, o.c.placed_at < until)).one()

    aov = revenue / orders if orders else None
    per_year = (orders / buyers) * (365.0 / options.active_days) if buyers else None
    retention = retained / prior if prior else None
    assumed = prior < options.min_buyers_for_retention or retention is None
    if assumed:
        lifetime = options.default_lifetime_years
    else:
        lifetime = options.max_lifetime_years if retention >= 1 else min(options.max_lifetime_years,
                                                                           1.0 / (1.0 - retention))
    clv = aov * per_year * lifetime if aov is not None and per_year is not None else None
    return Kpis(
        as_of=until, window_days=options.active_days, members_total=int(members_total), members_by_tier=by_tier,
        new_members=int(new_members), active_members=buyers, buyers=buyers, orders=orders, revenue_minor=revenue,
        aov_minor=aov, repurchase_rate=repeaters / buyers if buyers else None, purchases_per_buyer_per_year=per_year,
        retention_rate=retention, expected_lifetime_years=lifetime, lifetime_assumed=assumed, clv_minor=clv,
        period_orders=int(period_orders), period_revenue_minor=int(period_revenue),
        bgnbd=_bgnbd(conn, until, aov),
    )


def _retention(conn: Connection, o, purchase, prev: datetime, start: datetime, until: datetime) -> tuple[int, int]:
    """(buyers of the previous window, how many of them bought again in the current one)."""
    before = sa.select(o.c.member_id).where(purchase, o.c.placed_at >= prev, o.c.placed_at < start).distinct()
    now_ = sa.select(o.c.member_id).where(purchase, o.c.placed_at >= start, o.c.placed_at < until).distinct()
    b, n = before.subquery("before"), now_.subquery("now")
    prior, retained = conn.execute(sa.select(sa.func.count(b.c.member_id), sa.func.count(n.c.member_id))
                                   .select_from(b.outerjoin(n, n.c.member_id == b.c.member_id))).one()
    return int(prior), int(retained)


def _bgnbd(conn: Connection, until: datetime, aov: float | None) -> dict[str, Any] | None:
    """Mean BG/NBD expected purchases of the latest churn scoring on or before ``until`` (if scored)."""
    names = set(sa.inspect(conn).get_table_names())
    if not {"churn_scores", "churn_model_fits"} <= names:
        return None
    cs, fit = sa.table("churn_scores", sa.column("as_of_date"), sa.column("fit_id"), sa.column("p_alive"),
                       sa.column("expected_purchases")), sa.table("churn_model_fits", sa.column("id"),
                                                                 sa.column("horizon_days"))
    latest = conn.execute(sa.select(sa.func.max(cs.c.as_of_date)).where(cs.c.as_of_date <= until.date())).scalar()
    if latest is None:
        return None
    n, expected, alive, horizon = conn.execute(
        sa.select(sa.func.count(), sa.func.avg(cs.c.expected_purchases), sa.func.avg(cs.c.p_alive),
                  sa.func.max(fit.c.horizon_days))
        .select_from(cs.join(fit, fit.c.id == cs.c.fit_id)).where(cs.c.as_of_date == latest)
    ).one()
    if not n:
        return None
    expected = float(expected)
    return {"as_of_date": latest if isinstance(latest, date) else date.fromisoformat(str(latest)),
            "scored_buyers": int(n), "horizon_days": int(horizon) if horizon is not None else None,
            "mean_expected_purchases": expected, "mean_p_alive": float(alive),
            "expected_revenue_per_buyer_minor": expected * aov if aov is not None else None}


# ---------------------------------------------------------------------------------------------------------------------
# Trends


def _utc_offset_minutes(tz: str, at: datetime) -> int:
    off = at.astimezone(ZoneInfo(tz)).utcoffset() or timedelta(0)
    return int(off.total_seconds() // 60)


def bucket_expr(conn: Connection, col, options: ReportOptions):
    """The local calendar day (or the Monday of the ISO week) of a timestamp, in the shop's timezone.

    PostgreSQL converts with the zone's rules; SQLite applies the zone's UTC offset at ``until`` (exact
    for zones without daylight saving time, such as Asia/Taipei; an hour off around a DST change).
    """
    if is_sqlite(conn):
        shift = f"{_utc_offset_minutes(options.timezone, options.until):+d} minutes"
        if options.granularity == "week":
            return sa.func.date(col, shift, "weekday 0", "-6 days")
        return sa.func.date(col, shift)
    local = sa.func.timezone(options.timezone, col)
    if options.granularity == "week":
        return sa.cast(sa.func.date_trunc("week", local), sa.Date)
    return sa.cast(local, sa.Date)


def _as_date(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def trends(conn: Connection, options: ReportOptions) -> list[TrendPoint]:
    points: dict[date, TrendPoint] = {}

    def point(bucket) -> TrendPoint:
        d = _as_date(bucket)
        return points.setdefault(d, TrendPoint(d))

    camp = [OB.c.campaign == options.campaign] if options.campaign else []
    b = bucket_expr(conn, OB.c.sent_at, options)
    for bucket, n in conn.execute(sa.select(b, sa.func.count()).where(
            OB.c.state == OutboxState.SENT.value, OB.c.sent_at >= options.since, OB.c.sent_at < options.until, *camp
    ).group_by(b)):
        point(bucket).sent = int(n)

    b = bucket_expr(conn, E.c.occurred_at, options)
    query = sa.select(
        b, sa.func.count(sa.distinct(sa.case((E.c.kind.in_(_DELIVERED), E.c.message_id)))),
        sa.func.count(sa.distinct(sa.case((E.c.kind.in_(_OPENED), E.c.message_id)))),
        sa.func.count(sa.distinct(sa.case((E.c.kind.in_(_CLICKED), E.c.message_id)))),
        _sum_if(sa.or_(E.c.kind.in_(_OPTED_OUT),
                       sa.and_(E.c.kind == EventKind.INBOUND.value, E.c.reason == InboundCommand.STOP.value))),
    ).where(E.c.occurred_at >= options.since, E.c.occurred_at < options.until)
    if options.campaign:
        query = query.select_from(E.join(OB, OB.c.message_id == E.c.message_id)).where(*camp)
    for bucket, delivered, opened, clicked, unsub in conn.execute(query.group_by(b)):
        p = point(bucket)
        p.delivered, p.opened, p.clicked, p.unsubscribed = int(delivered), int(opened), int(clicked), int(unsub)

    b = bucket_expr(conn, A.c.converted_at, options)
    acamp = [A.c.campaign == options.campaign] if options.campaign else []
    for bucket, n, revenue in conn.execute(sa.select(b, sa.func.count(), sa.func.sum(A.c.revenue_minor)).where(
            A.c.model == options.attribution.model.value, A.c.conversion_type == ConversionType.ORDER.value,
            A.c.converted_at >= options.since, A.c.converted_at < options.until, *acamp).group_by(b)):
        p = point(bucket)
        p.conversions, p.revenue_minor = int(n), int(revenue or 0)

    # Every bucket of the range, so that a quiet day shows as zero rather than disappearing from a chart.
    tz = ZoneInfo(options.timezone)
    first = options.since.astimezone(tz).date()
    last = (options.until - timedelta(microseconds=1)).astimezone(tz).date()
    step = timedelta(days=7 if options.granularity == "week" else 1)
    if options.granularity == "week":
        first -= timedelta(days=first.weekday())
    d = first
    while d <= last:
        points.setdefault(d, TrendPoint(d))
        d += step
    return [points[k] for k in sorted(points)]
