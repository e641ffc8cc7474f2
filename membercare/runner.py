"""The campaign runner: one campaign occurrence from definition to summary, without Prefect.

A run is a sequence of stages, each a plain function with typed inputs and outputs, so that the Prefect
flow (``flows/campaign.py``) only sequences them (one task per stage or per group of batches) and tests,
benchmarks and scripts can call them directly::

    prepared = prepare(settings, "birthday", RunOptions(as_of=...))      # occurrence, spec, pre-flight check
    audience = resolve_audience(engine, prepared)                      # segment size + member keys (no PII)
    for group in audience.groups(20_000):
        plan_group(engine, prepared, group)                              # coupons, contexts, routing, outbox rows
    outcome = dispatch_round(engine, run_id, adapters)                   # send what is due
    summary = summarise(engine, run_id, audience.size)

or all at once with :func:`run_campaign`. A **dry run** (:func:`dry_run`) takes exactly the decisions of a
real run (the planner's own batch function, coupon issuing included) inside transactions that are rolled
back, and returns what would go out: counts per channel and reason plus a few rendered samples.

Exactly-once rests on the database, never on the orchestrator: the occurrence key (campaign, occurrence,
member [, coupon]) is the outbox's unique idempotency key, coupons are issued with deterministic codes
(``INSERT ... ON CONFLICT DO NOTHING``), and dispatch only claims planned or deferred rows. Rerunning any
stage, or the whole run, sends nothing twice.

**Occurrence keys** come from the campaign's ``occurrence`` granularity in the *shop's* time zone
(``hourly`` ``2026-11-23T09``, ``daily`` ``2026-11-23``, ``weekly`` ``2026-W48``, ``monthly`` ``2026-11``,
``once`` ``once``), optionally suffixed with a tag (``RunOptions.occurrence_tag``) when one campaign has
several schedules that must not share a key (the coupon-expiry reminders three days and one day ahead).
Event-triggered campaigns (``trigger:``) key on the event: ``message_per: order`` campaigns on the local
date the message is due (delivery date + ``delay_days``), so the daily sweep and an explicit trigger for
the same order can never both send; other triggered campaigns on the event reference when one is given
(``review-R123``), else on the day.

**Holdouts**: marketing campaigns hold out ``params.holdout_rate`` of the audience (default 10 %,
``membercare.optimise.assignment``; stable per campaign across occurrences). Held-out members get an
outbox row in state ``skipped`` with reason ``holdout``, no message and no offer coupon, so lift can be
measured against them. Transactional campaigns are never held out.

Nothing here logs or returns contact data: audiences are member ids (plus coupon codes or order
references where the message is about one), summaries are counts.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import logging
import os
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.campaigns import Campaign, load_campaign
from membercare.config import Settings
from membercare.db import insert_for
from membercare.delivery.contract import ChannelAdapter, Content, EmailContent, PushContent, SmsContent
from membercare.delivery.models import CampaignRun, OutboxMessage, OutboxState, RunStatus, decode_contents
from membercare.delivery.planner import (
    PlanReport,
    PlanSpec,
    Recipient,
    RenderRequest,
    new_message_id,
    plan_run,
)
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.errors import DataError, InputError
from membercare.models import PURCHASE_STATUSES, Channel, Coupon, Member, Order, OrderStatus, Purpose
from membercare.optimise import assignment
from membercare.timeutil import UTC, ensure_utc, utcnow

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000  # members per planning batch (one transaction)
DEFAULT_GROUP_SIZE = 20_000  # members per planning task in the flow (a few seconds of work)
# Planning groups smaller than this are planned in the calling process even when RunOptions.processes is left
# to its default: starting worker processes (about a second each) would cost more than they save.
POOL_MIN_MEMBERS = 5_000
DEFAULT_MAX_PROCESSES = 4  # planning workers by default: the planning process's writes cap the gain beyond this
MAX_PROCESSES = 64

class RenderFailed(DataError):
    """A message could not be rendered for one member (template error or over a channel limit).

    Planning of that batch is rolled back; since planning is idempotent, fix the template and rerun.
    """


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class RunOptions:
    """How to run one campaign occurrence. Every field has a safe default.

    ``channels`` narrows the campaign's allowed channels (never widens them). ``segment_params`` override
    the campaign's segment parameters for this run. ``members`` replaces the segment by an explicit
    audience (event triggers); ``order_ref`` names the order a ``message_per: order`` message is about,
    ``event_ref`` the event a triggered message answers (it becomes the occurrence key).
    """

    as_of: datetime | None = None
    dry_run: bool = False
    limit: int | None = None
    channels: tuple[Channel, ...] | None = None
    segment_params: Mapping[str, Any] = field(default_factory=dict)
    occurrence_tag: str | None = None
    holdout_rate: float | None = None
    members: tuple[int, ...] | None = None
    order_ref: str | None = None
    event_ref: str | None = None
    occurrence_at: datetime | None = None  # the instant the occurrence key is taken from (default: as_of)
    batch_size: int = DEFAULT_BATCH_SIZE
    samples: int = 3
    # Worker processes that read and render planning batches while this process writes them (see
    # plan_group): None = one per core for large groups (see planning_processes), 0 = plan in this process,
    # n = n workers.
    processes: int | None = None

    def __post_init__(self) -> None:
        if self.processes is not None and not 0 <= self.processes <= MAX_PROCESSES:
            raise InputError(f"processes must be between 0 and {MAX_PROCESSES} (got {self.processes})")
        if self.limit is not None and self.limit < 0:
            raise InputError(f"limit must not be negative (got {self.limit})")
        if self.batch_size < 1:
            raise InputError("batch size must be at least 1")
        if self.holdout_rate is not None and not 0.0 <= self.holdout_rate < 1.0:
            raise InputError(f"holdout rate must be in [0, 1), got {self.holdout_rate}")
        if self.occurrence_tag is not None and not _valid_tag(self.occurrence_tag):
            raise InputError(f"occurrence tag {self.occurrence_tag!r}: use 1-16 letters, digits, '-' or '_'")


def _valid_tag(tag: str) -> bool:  # noqa: N802 - reads like a predicate constant
    return 0 < len(tag) <= 16 and all(c.isalnum() or c in "-_" for c in tag)


@dataclass(frozen=True)
class PreparedRun:
    """A campaign occurrence ready to plan: the definition, its occurrence key and the planner's spec."""

    campaign: Campaign
    spec: PlanSpec
    as_of: datetime
    occurrence: str
    holdout_rate: float
    segment_params: Mapping[str, Any]
    options: RunOptions
    settings: Settings

    @property
    def name(self) -> str:
        return self.campaign.name


# ------------------------------------------------------------------------------------------- occurrence


def occurrence_key(granularity: str, as_of: datetime, timezone: str, *, tag: str | None = None) -> str:
    """The occurrence bucket of ``as_of`` in ``timezone`` (see the module docstring)."""
    local = ensure_utc(as_of).astimezone(ZoneInfo(timezone))
    if granularity == "hourly":
        key = local.strftime("%Y-%m-%dT%H")
    elif granularity == "daily":
        key = local.date().isoformat()
    elif granularity == "weekly":
        year, week, _ = local.isocalendar()
        key = f"{year}-W{week:02d}"
    elif granularity == "monthly":
        key = local.strftime("%Y-%m")
    elif granularity == "once":
        key = "once"
    else:
        raise InputError(f"unknown occurrence granularity {granularity!r}")
    return f"{key}:{tag}" if tag else key


def _event_occurrence(campaign: Campaign, as_of: datetime, timezone: str, options: RunOptions) -> str:
    if campaign.message_per == "order":
        # The due date: the sweep on day D and a trigger for an order due on D share the key.
        return "due-" + occurrence_key("daily", as_of, timezone)
    if options.event_ref:
        ref = "".join(c if c.isalnum() or c in "-_.:" else "_" for c in options.event_ref)[:48]
        return f"event-{ref}"
    return occurrence_key("daily", as_of, timezone)


def holdout_rate_for(campaign: Campaign, override: float | None = None) -> float:
    """``override``, else ``params.holdout_rate`` of the campaign, else 10 % for marketing, 0 for transactional."""
    rate = override if override is not None else campaign.params.get("holdout_rate")
    if campaign.purpose == Purpose.TRANSACTIONAL:
        if rate:
            raise InputError(f"campaign {campaign.name} is transactional: it cannot have a holdout")
        return 0.0
    rate = assignment.DEFAULT_HOLDOUT_RATE if rate is None else float(rate)
    if not 0.0 <= rate < 1.0:
        raise InputError(f"campaign {campaign.name}: holdout_rate must be in [0, 1), got {rate}")
    return rate


def segment_params_for(campaign: Campaign, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The campaign's segment parameters with ``overrides`` applied."""
    if campaign.segment is None:
        if overrides:
            raise InputError(f"campaign {campaign.name} is event-triggered: it has no segment parameters")
        return {}
    return {**campaign.segment.params, **(overrides or {})}


# --------------------------------------------------------------------------------------------- prepare


def prepare(settings: Settings, campaign: Campaign | str, options: RunOptions | None = None, *,
            check: bool = True) -> PreparedRun:
    """Load the campaign, compute its occurrence key and spec, and run the template pre-flight check.

    Raises :class:`~membercare.rendering.check.TemplateCheckError` when the templates fail the check
    (the campaign must not start), :class:`UnknownNameError` for an unknown campaign.
    """
    options = options or RunOptions()
    camp = load_campaign(campaign, settings) if isinstance(campaign, str) else campaign
    as_of = ensure_utc(options.as_of) if options.as_of is not None else utcnow()
    tz = settings.shop_timezone
    key_at = ensure_utc(options.occurrence_at) if options.occurrence_at is not None else as_of
    if camp.trigger is not None:
        occurrence = _event_occurrence(camp, key_at, tz, options)
        if options.occurrence_tag:
            occurrence = f"{occurrence}:{options.occurrence_tag}"
    else:
        occurrence = occurrence_key(camp.occurrence, key_at, tz, tag=options.occurrence_tag)
    channels = tuple(camp.channels)
    if options.channels is not None:
        wanted = {Channel(c) for c in options.channels}
        unknown = wanted - set(channels)
        if unknown:
            raise InputError(f"campaign {camp.name} does not use {', '.join(sorted(c.value for c in unknown))}; "
                             f"its channels: {', '.join(c.value for c in channels)}")
        channels = tuple(c for c in channels if c in wanted)
        if not channels:
            raise InputError("no channel left: give at least one of the campaign's channels")
    if check:
        from membercare.rendering.check import ensure_campaign_ready

        ensure_campaign_ready(camp.name, settings)
    spec = PlanSpec(campaign=camp.name, occurrence=occurrence, purpose=Purpose(camp.purpose), channels=channels,
                    priority=camp.priority)
    return PreparedRun(campaign=camp, spec=spec, as_of=as_of, occurrence=occurrence,
                       holdout_rate=holdout_rate_for(camp, options.holdout_rate),
                       segment_params=segment_params_for(camp, options.segment_params), options=options,
                       settings=settings)


# --------------------------------------------------------------------------------------------- audience


@dataclass(frozen=True)
class AudienceEntry:
    """One message's worth of audience: a member, and the coupon or order it is about (if any)."""

    member_id: int
    coupon_code: str | None = None
    order_ref: str | None = None


@dataclass
class Audience:
    """Who the run is for: keys only (member ids, coupon codes, order references), never contact data.

    ``size`` is the full segment size; ``entries`` may be cut by ``RunOptions.limit``.
    """

    size: int
    entries: list[AudienceEntry]
    source: str  # "segment birthday_today(...)", "members", "orders delivered on 2026-11-16"

    def __len__(self) -> int:
        return len(self.entries)

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[list[AudienceEntry]]:
        for i in range(0, len(self.entries), batch_size):
            yield self.entries[i:i + batch_size]

    def groups(self, group_size: int = DEFAULT_GROUP_SIZE) -> list[list[AudienceEntry]]:
        """Consecutive slices for parallel or separately retried planning (one flow task each)."""
        return [self.entries[i:i + group_size] for i in range(0, len(self.entries), group_size)]


def resolve_audience(engine: Engine, prepared: PreparedRun) -> Audience:
    """Evaluate the campaign's audience for ``prepared.as_of``: a segment, explicit members, or due orders."""
    opts, camp = prepared.options, prepared.campaign
    if opts.members is not None:
        entries = [AudienceEntry(int(m), order_ref=opts.order_ref) for m in dict.fromkeys(opts.members)]
        with engine.connect() as conn:
            m = Member.__table__
            known = set(conn.execute(sa.select(m.c.id).where(m.c.id.in_([e.member_id for e in entries]))).scalars())
        missing = [e.member_id for e in entries if e.member_id not in known]
        if missing:
            raise InputError(f"unknown member id(s): {', '.join(map(str, missing[:10]))}")
        return Audience(len(entries), _limit(entries, opts.limit), "members")
    if camp.segment is not None:
        return _segment_audience(engine, prepared)
    if camp.trigger is not None and camp.trigger.event == "order.delivered":
        return _delivered_orders_audience(engine, prepared)
    raise InputError(f"campaign {camp.name} is started by the event {camp.trigger.event if camp.trigger else '?'}: "
                     f"use `membercare trigger` for one member")


def _limit(entries: list[AudienceEntry], limit: int | None) -> list[AudienceEntry]:
    return entries if limit is None else entries[:limit]


def _segment(prepared: PreparedRun):
    from segments.base import ref

    return ref(prepared.campaign.segment.name, **prepared.segment_params)


def _segment_audience(engine: Engine, prepared: PreparedRun) -> Audience:
    from segments.base import context, count

    seg = _segment(prepared)
    per_coupon = prepared.campaign.per_coupon
    limit = prepared.options.limit
    entries: list[AudienceEntry] = []
    with engine.connect() as conn:
        ctx = context(conn, prepared.as_of, prepared.settings.shop_timezone)
        size = count(ctx, seg)
        q = seg.select(ctx).subquery()
        cols = [q.c.member_id]
        if per_coupon:
            if "coupon_codes" not in q.c:
                raise InputError(f"campaign {prepared.name} sends one message per coupon but segment "
                                 f"{prepared.campaign.segment.name} does not list coupons")
            cols.append(q.c.coupon_codes)
        stmt = sa.select(*cols).order_by(q.c.member_id)
        if limit is not None:
            stmt = stmt.limit(limit)
        # Streamed (server-side cursor on PostgreSQL); only keys are kept.
        result = conn.execute(stmt, execution_options={"yield_per": 10_000})
        for part in result.partitions(10_000):
            for row in part:
                code = None
                if per_coupon:
                    # The segment lists a member's coupons soonest-expiring first; the message is about that one
                    # (the template shows the others too), and the coupon joins the idempotency key.
                    code = (row[1] or "").split(",")[0].strip() or None
                entries.append(AudienceEntry(int(row[0]), coupon_code=code))
    label = f"segment {prepared.campaign.segment.name}"
    if prepared.segment_params:
        label += "(" + ", ".join(f"{k}={v}" for k, v in sorted(prepared.segment_params.items())) + ")"
    return Audience(size, entries, label)


def _delivered_orders_audience(engine: Engine, prepared: PreparedRun) -> Audience:
    """Members whose order was delivered ``delay_days`` before the run's shop-local date (one per member)."""
    tz = ZoneInfo(prepared.settings.shop_timezone)
    delay = prepared.campaign.trigger.delay_days
    day = prepared.as_of.astimezone(tz).date() - timedelta(days=delay)
    start = datetime.combine(day, time(0), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    o = Order.__table__
    rn = sa.func.row_number().over(partition_by=o.c.member_id, order_by=(o.c.delivered_at.desc(), o.c.id.desc()))
    inner = (sa.select(o.c.member_id, o.c.external_id, rn.label("rn"))
             .where(o.c.status == OrderStatus.DELIVERED.value, o.c.delivered_at >= start, o.c.delivered_at < end)
             .subquery())
    stmt = sa.select(inner.c.member_id, inner.c.external_id).where(inner.c.rn == 1).order_by(inner.c.member_id)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    entries = [AudienceEntry(int(r[0]), order_ref=r[1]) for r in rows]
    return Audience(len(entries), _limit(entries, prepared.options.limit), f"orders delivered on {day.isoformat()}")


# ---------------------------------------------------------------------------------------- offer coupons


def coupon_code(campaign: str, occurrence: str, member_id: int) -> str:
    """The deterministic code of the offer coupon a campaign occurrence issues to a member.

    Deterministic so that a rerun (or a second worker) issues the same coupon, which the unique
    ``coupons.code`` turns into a no-op. 50 bits of SHA-256 in Crockford-free base32: unguessable enough for
    a code that is only valid for its member.
    """
    digest = hashlib.sha256(f"{campaign}|{occurrence}|{member_id}".encode()).digest()
    tail = base64.b32encode(digest[:10]).decode().rstrip("=")[:10]
    prefix = "".join(c for c in campaign.upper() if c.isalnum())[:16] or "MC"
    return f"{prefix}-{tail}"


def issue_offer_coupons(conn: Connection, prepared: PreparedRun, member_ids: Sequence[int]) -> int:
    """Issue the campaign's offer coupon to ``member_ids`` (idempotent); returns how many were new.

    The value step follows each member's trailing-365-day spend (``Offer.for_spend``), computed in one query.
    """
    offer = prepared.campaign.offer
    if offer is None or not member_ids:
        return 0
    o, c = Order.__table__, Coupon.__table__
    as_of = prepared.as_of
    spend = dict(conn.execute(
        sa.select(o.c.member_id, sa.func.coalesce(sa.func.sum(o.c.total_minor), 0))
        .where(o.c.member_id.in_(list(member_ids)), o.c.status.in_(PURCHASE_STATUSES),
               o.c.placed_at <= as_of, o.c.placed_at > as_of - timedelta(days=365))
        .group_by(o.c.member_id)).all())
    rows = []
    for mid in member_ids:
        step = offer.for_spend(int(spend.get(mid, 0)))
        rows.append(dict(
            code=coupon_code(prepared.name, prepared.occurrence, mid), member_id=mid, kind=offer.kind.value,
            amount_minor=step.amount_minor, percent_off=step.percent_off, currency=offer.currency,
            min_spend_minor=offer.min_spend_minor, issued_at=as_of,
            expires_at=as_of + timedelta(days=offer.valid_days), redeemed_at=None, redeemed_order_id=None,
            campaign=prepared.name))
    ins = insert_for(conn, c).on_conflict_do_nothing(index_elements=["code"]).returning(c.c.code)
    return len(conn.execute(ins, rows).scalars().all())


# ----------------------------------------------------------------------------------- rendering adapter


class PlannerRenderer:
    """Adapts :class:`membercare.rendering.CampaignRenderer` to the planner's ``Renderer`` protocol.

    The template context is built once per *batch* (:func:`recipients_for_batch`, a handful of set-based
    queries) and travels with each :class:`Recipient`; rendering a channel is then pure CPU work.
    """

    def __init__(self, renderer) -> None:
        self.renderer = renderer

    def __call__(self, request: RenderRequest) -> Content:
        from membercare.rendering import ContentLimitError, RenderError

        if not request.context:
            raise RenderFailed(f"{request.campaign}: no template context for member id {request.member.get('id')}")
        try:
            return self.renderer.render(request.channel, request.context, message_id=request.message_id,
                                        as_of=request.as_of, variant=request.variant)
        except (RenderError, ContentLimitError) as exc:
            raise RenderFailed(f"{request.campaign}: rendering {request.channel.value} for member id "
                               f"{request.member.get('id')} failed: {exc}") from exc


def make_renderer(prepared: PreparedRun, *, preview: bool = False):
    """The campaign's renderer; ``preview`` signs links with the preview-only key (dry runs without a secret)."""
    from membercare.links import LinkSigner
    from membercare.rendering import CampaignRenderer

    signer = LinkSigner.preview() if preview else None
    return CampaignRenderer(prepared.campaign, prepared.settings, signer=signer)


def recipients_for_batch(conn: Connection, prepared: PreparedRun, renderer, batch: Sequence[AudienceEntry],
                         *, issue_coupons: bool = True) -> list[Recipient]:
    """Issue offer coupons (not to held-out members), build the batch's template contexts, make Recipients."""
    ids = [e.member_id for e in batch]
    if issue_coupons and prepared.campaign.offer is not None:
        held = set(_held_out(prepared, ids))
        issue_offer_coupons(conn, prepared, [m for m in ids if m not in held])
    contexts = renderer.build_context(conn, ids, prepared.as_of)
    from membercare.rendering.context import with_coupon, with_order

    out = []
    for e in batch:
        ctx = contexts.get(e.member_id)
        if ctx is None:
            continue  # deleted since the audience was resolved; the planner would refuse it
        if e.coupon_code:
            try:
                ctx = with_coupon(ctx, e.coupon_code)
            except KeyError:
                pass  # redeemed since the segment ran: the soonest open coupon stands in
        if e.order_ref:
            try:
                ctx = with_order(ctx, e.order_ref)
            except KeyError:
                pass  # older than the recent orders the context holds: the last order stands in
        out.append(Recipient(e.member_id, coupon_code=e.coupon_code, context=ctx))
    return out


def _held_out(prepared: PreparedRun, ids: Sequence[int]) -> list[int]:
    """Members who get no message (campaign holdout or programme-wide global control): no offer coupon."""
    from membercare.optimise.planning import in_control_or_holdout

    control = prepared.settings.global_control_rate if prepared.campaign.purpose == Purpose.MARKETING else 0.0
    if (prepared.holdout_rate <= 0 and control <= 0) or not ids:
        return []
    return in_control_or_holdout(ids, prepared.name, holdout_rate=prepared.holdout_rate, control_rate=control,
                                 control_salt=prepared.settings.global_control_salt)


def make_assigner(prepared: PreparedRun):
    """The planner's ``assign`` hook without variants: the global control group (marketing campaigns, when
    ``MEMBERCARE_GLOBAL_CONTROL_RATE`` > 0, answer ``"global_control"``), then the campaign holdout
    (``"holdout"``); None when neither applies. :func:`make_plan_hooks` adds the variant test."""
    from membercare.optimise.planning import Assigner

    control = prepared.settings.global_control_rate if prepared.campaign.purpose == Purpose.MARKETING else 0.0
    if prepared.holdout_rate <= 0 and control <= 0:
        return None
    return Assigner(prepared.name, prepared.occurrence, holdout_rate=prepared.holdout_rate, control_rate=control,
                    control_salt=prepared.settings.global_control_salt)


def make_plan_hooks(engine: Engine, prepared: PreparedRun) -> dict[str, Any]:
    """The planner's extension points for this run: ``assign`` (holdout, global control, variants),
    ``prefer`` (routing strategy) and ``deliver_at`` (send time), as keyword arguments of
    :func:`~membercare.delivery.planner.plan_run` / ``_plan_batch``. Built once per planning group, so
    anything learnt from engagement history is read once, not per member (and cached across the groups
    of a run: :mod:`membercare.optimise.planning`). ``assign`` is always present (possibly None)."""
    from membercare.optimise.planning import build_hooks

    return build_hooks(engine, prepared)


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class PlanOutcome:
    """What planning one group did (counts only)."""

    run_id: int
    inserted: int = 0
    already_planned: int = 0
    preempted: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_report(cls, rep: PlanReport) -> "PlanOutcome":
        return cls(rep.run_id, rep.inserted, rep.already_planned, rep.preempted, dict(rep.by_state),
                   dict(rep.by_reason))

    def merge(self, other: "PlanOutcome") -> "PlanOutcome":
        st, rs = Counter(self.by_state), Counter(self.by_reason)
        st.update(other.by_state)
        rs.update(other.by_reason)
        return PlanOutcome(other.run_id or self.run_id, self.inserted + other.inserted,
                           self.already_planned + other.already_planned, self.preempted + other.preempted,
                           dict(st), dict(rs))


def plan_group(engine: Engine, prepared: PreparedRun, entries: Sequence[AudienceEntry], *,
               renderer=None, policy: PolicySettings | None = None,
               message_ids: Callable[[], str] = new_message_id) -> PlanOutcome:
    """Plan (and render) outbox rows for a group of audience entries, batch by batch. Idempotent.

    With worker processes (``RunOptions.processes``, see :func:`planning_processes`), each batch's reads
    (template and routing contexts, already planned keys) and its rendering run in a worker while this
    process issues coupons and writes earlier batches; this process keeps every write. Otherwise the
    whole batch runs here, as :func:`~membercare.delivery.planner.plan_run` does.
    """
    processes = planning_processes(engine, prepared.options, len(entries))
    if processes:
        return _plan_group_pooled(engine, prepared, entries, processes, policy=policy, message_ids=message_ids)
    renderer = renderer or make_renderer(prepared)
    adapter = PlannerRenderer(renderer)
    size = prepared.options.batch_size

    def batches() -> Iterator[list[Recipient]]:
        for i in range(0, len(entries), size):
            batch = entries[i:i + size]
            # Coupons commit in their own short transaction; the planner's batch transaction follows.
            with engine.begin() as conn:
                recipients = recipients_for_batch(conn, prepared, renderer, batch)
            yield recipients

    report = plan_run(engine, prepared.spec, batches(), prepared.as_of, adapter, policy=policy,
                      message_ids=message_ids, **make_plan_hooks(engine, prepared))
    return PlanOutcome.from_report(report)


# ------------------------------------------------------------------------------------ planning processes
#
# Planning a large audience is CPU work: building template contexts, routing, rendering every channel of
# each member's fallback chain and compressing it. Python runs that on one core, so plan_group can hand
# each batch's read-only part to a fixed pool of worker processes (spawned once per process and reused by
# every planning group and run) while this process does what must stay serial: it issues the batch's offer
# coupons, then, when the worker's batch comes back (in order), takes the planning lock, applies the
# frequency cap against the other runs' rows as they are at that moment, and inserts. All writes stay here.
#
# Guarantees are those of the serial path: rows are written before any send with their idempotency keys
# (a rerun adds nothing); the frequency cap is decided under the lock; a worker's error (a template that
# fails for one member) aborts the group with that member named, after the batches before it were
# written. Routing reads consent, reachability and suppressions a moment before the lock is taken;
# the dispatcher re-checks consent and suppression right before every send.


def planning_processes(engine: Engine, options: RunOptions, members: int) -> int:
    """Worker processes for planning ``members`` members: 0 means plan in this process.

    ``options.processes`` None: one worker per core (up to ``DEFAULT_MAX_PROCESSES``) for groups of at least
    ``POOL_MIN_MEMBERS`` members on a machine with two cores or more, else 0; an explicit number is used as
    given whenever the group has more than one batch. An in-memory SQLite database cannot be shared: always 0.
    """
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else "x"
    if not db or db == ":memory:" or members <= options.batch_size:
        return 0
    if options.processes is not None:
        return options.processes
    # Default: one worker per core (at most DEFAULT_MAX_PROCESSES) for groups worth the ~1 s start of each.
    # Measured on 2 idle cores, a 100k-member campaign flow planned in 27.7 s with two workers against
    # 64.8 s serially (docs/benchmark.md); on a machine whose cores are busy the pool gains nothing (and its
    # workers cost ~10 % more CPU in total), so pass processes=0 there.
    cores = os.cpu_count() or 1
    if members < POOL_MIN_MEMBERS or cores < 2:
        return 0
    return min(cores, DEFAULT_MAX_PROCESSES)


_POOLS: dict[int, Any] = {}
_POOLS_LOCK = threading.Lock()


def _pool(processes: int):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with _POOLS_LOCK:
        pool = _POOLS.get(processes)
        if pool is None:
            # spawn, never fork: the planning process may run threads (Prefect, dispatcher) and hold
            # database connections that a forked child must not share.
            pool = _POOLS[processes] = ProcessPoolExecutor(processes, mp_context=get_context("spawn"))
        return pool


def shutdown_planning_pools() -> None:
    """Stop the planning worker processes (they are otherwise reused until this process exits)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


# Stop the workers while the interpreter is whole; an executor collected during its teardown prints
# "Exception ignored ... 'NoneType' object has no attribute 'util'" at exit. (A no-op when no pool ran.)
atexit.register(shutdown_planning_pools)


@dataclass(frozen=True)
class _PlanJob:
    """One batch for a worker: everything it needs, as plain picklable data."""

    url: str
    run_key: str  # identifies the run (and the template files' state): the worker's renderer cache key
    group_token: str  # identifies the planning group: hooks are built once per group, as in this process
    prepared: PreparedRun
    run_id: int
    policy: PolicySettings
    entries: tuple[AudienceEntry, ...]
    message_ids: tuple[str, ...]


def _templates_signature(settings: Settings, campaign: str) -> str:
    """Names, sizes and modification times of the template files a campaign reads (edits invalidate workers)."""
    root = Path(settings.templates_dir)
    parts = []
    for folder in (root, root / campaign, root / "_layout"):
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.is_file():
                        st = e.stat()
                        parts.append(f"{e.path}:{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            continue
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


def _issue_batch_coupons(engine: Engine, prepared: PreparedRun, batch: Sequence[AudienceEntry]) -> None:
    if prepared.campaign.offer is None:
        return
    ids = [e.member_id for e in batch]
    held = set(_held_out(prepared, ids))
    with engine.begin() as conn:
        issue_offer_coupons(conn, prepared, [m for m in ids if m not in held])


def _plan_group_pooled(engine: Engine, prepared: PreparedRun, entries: Sequence[AudienceEntry], processes: int, *,
                       policy: PolicySettings | None, message_ids: Callable[[], str]) -> PlanOutcome:
    import pickle
    from collections import deque

    from membercare.delivery import planner as _planner

    run_id = ensure_run(engine, prepared)
    if policy is None:
        with engine.connect() as conn:
            policy = load_policy(conn)
    url = engine.url.render_as_string(hide_password=False)
    run_key = hashlib.sha256(pickle.dumps((url, prepared)) + _templates_signature(
        prepared.settings, prepared.name).encode()).hexdigest()
    token = uuid.uuid4().hex
    report = PlanReport(run_id)
    pool = _pool(processes)
    size = prepared.options.batch_size
    inflight: deque = deque()

    hooks: dict[str, Any] = {}

    def deliver_at(ctx, rc, channel):
        # Only needed when a per-channel cap drops a row's first channel (rare): the workers built the hooks
        # for everything else, so this process builds them only then.
        if not hooks:
            hooks.update(make_plan_hooks(engine, prepared), built=True)
        fn = hooks.get("deliver_at")
        return fn(ctx, rc, channel) if fn else None

    def write(fut) -> None:
        batch = fut.result()
        with engine.begin() as conn:
            _planner.write_prepared(conn, run_id, prepared.spec, batch, prepared.as_of, policy, report,
                                    deliver_at=deliver_at)

    try:
        for i in range(0, len(entries), size):
            batch = tuple(entries[i:i + size])
            _issue_batch_coupons(engine, prepared, batch)
            job = _PlanJob(url, run_key, token, prepared, run_id, policy, batch,
                           tuple(message_ids() for _ in batch))
            inflight.append(pool.submit(_prepare_in_worker, job))
            # Keep every worker busy while this process writes the oldest batch; never more in flight
            # than that (memory stays flat in the audience size).
            if len(inflight) > processes:
                write(inflight.popleft())
        while inflight:
            write(inflight.popleft())
    except BaseException as exc:
        for fut in inflight:
            fut.cancel()
        from concurrent.futures.process import BrokenProcessPool

        if isinstance(exc, BrokenProcessPool):
            with _POOLS_LOCK:
                if _POOLS.get(processes) is pool:
                    del _POOLS[processes]
            pool.shutdown(wait=False, cancel_futures=True)  # a broken pool is never reused; release it now
        raise
    from membercare.delivery.planner import refresh_run_counts

    with engine.begin() as conn:
        refresh_run_counts(conn, run_id, reopen=report.inserted > 0)
    return PlanOutcome.from_report(report)


# State of a planning worker process (one job at a time): engines by URL, the current run's renderer and
# the current group's hooks.
_WORKER: dict[str, Any] = {"engines": {}, "run_key": None, "renderer": None, "token": None, "hooks": {}}


def _prepare_in_worker(job: _PlanJob):
    """Worker side of :func:`_plan_group_pooled`: read and render one batch (no writes, no lock)."""
    from membercare.db import make_engine
    from membercare.delivery.planner import prepare_batch

    w = _WORKER
    engine = w["engines"].get(job.url)
    if engine is None:
        engine = w["engines"][job.url] = make_engine(job.url)
    prepared = job.prepared
    if w["run_key"] != job.run_key:
        from membercare.rendering.renderer import reset_stores

        reset_stores()  # template files may have changed since this worker last compiled them
        w["renderer"], w["run_key"] = make_renderer(prepared), job.run_key
    if w["token"] != job.group_token:
        w["hooks"], w["token"] = make_plan_hooks(engine, prepared), job.group_token
    hooks, renderer = w["hooks"], w["renderer"]
    with engine.connect() as conn:
        recipients = recipients_for_batch(conn, prepared, renderer, job.entries, issue_coupons=False)
        batch = prepare_batch(conn, prepared.spec, recipients, prepared.as_of, PlannerRenderer(renderer), job.policy,
                              hooks.get("assign"), job.message_ids, prefer=hooks.get("prefer"),
                              deliver_at=hooks.get("deliver_at"), run_id=job.run_id)
        conn.rollback()
    return batch


def ensure_run(engine: Engine, prepared: PreparedRun) -> int:
    """The ``campaign_runs`` id of the occurrence (created when missing); an empty audience still gets one."""
    from membercare.delivery.planner import get_or_create_run

    return get_or_create_run(engine, prepared.spec, prepared.as_of)


# --------------------------------------------------------------------------------------------- dry run


@dataclass
class RenderedSample:
    """One rendered message of a dry run, for an operator to read (it contains the member's name)."""

    member_id: int
    channel: str
    headline: str  # subject / push title / first SMS line
    body: str  # text part / push body / SMS, shortened
    detail: str  # "UCS-2, 2 segments" ...


@dataclass
class DryRunReport:
    campaign: str
    occurrence: str
    audience_size: int
    considered: int
    would_send: dict[str, int] = field(default_factory=dict)  # channel -> messages planned to go out now
    deferred: dict[str, int] = field(default_factory=dict)  # channel -> deferred (quiet hours)
    by_state: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    already_planned: int = 0
    coupons_to_issue: int = 0
    samples: list[RenderedSample] = field(default_factory=list)


def dry_run(engine: Engine, prepared: PreparedRun, audience: Audience, *, renderer=None,
            policy: PolicySettings | None = None) -> DryRunReport:
    """Plan and render exactly as a real run would, in transactions that are rolled back: writes nothing.

    Each batch runs the planner's own batch function (routing, policies, holdouts, rendering) plus coupon
    issuing inside one transaction, reads back what it would have inserted, and rolls back. Locks are those
    of a real planning batch, held as briefly. Members already planned for this occurrence are counted in
    ``already_planned`` (a rerun would send them nothing).
    """
    from membercare.delivery import planner as _planner

    if renderer is None:
        renderer = make_renderer(prepared, preview=not prepared.settings.secret_key)
    adapter = PlannerRenderer(renderer)
    hooks = make_plan_hooks(engine, prepared)
    spec = prepared.spec
    rep = DryRunReport(prepared.name, prepared.occurrence, audience.size, len(audience))
    state, reason, send, deferred = Counter(), Counter(), Counter(), Counter()
    o, c = OutboxMessage.__table__, Coupon.__table__
    with engine.connect() as conn:
        pol = policy or load_policy(conn)
        conn.rollback()
    for batch in audience.batches(prepared.options.batch_size):
        with engine.connect() as conn:
            tx = conn.begin()
            try:
                run_id = _run_row_in(conn, prepared)
                coupons_before = conn.execute(sa.select(sa.func.count()).select_from(c)
                                              .where(c.c.campaign == prepared.name)).scalar_one()
                recipients = recipients_for_batch(conn, prepared, renderer, batch)
                rep.coupons_to_issue += conn.execute(sa.select(sa.func.count()).select_from(c).where(
                    c.c.campaign == prepared.name)).scalar_one() - coupons_before
                report = PlanReport(run_id)
                minted: list[str] = []

                def mint() -> str:
                    mid = new_message_id()
                    minted.append(mid)
                    return mid

                # The planner's batch function: the same decisions as plan_run, inside our transaction.
                _planner._plan_batch(conn, run_id, spec, recipients, prepared.as_of, adapter, pol,
                                     hooks["assign"], mint, report,
                                     **{k: v for k, v in hooks.items() if k != "assign"})
                rep.already_planned += report.already_planned
                # Only the rows this transaction inserted carry a message id minted here.
                created = conn.execute(
                    sa.select(o.c.member_id, o.c.state, o.c.reason_code, o.c.channel, o.c.content)
                    .where(o.c.message_id.in_(minted))
                ).all() if report.inserted else []
                for r in created:
                    state[r.state] += 1
                    reason[r.reason_code] += 1
                    if r.state == OutboxState.PLANNED.value:
                        send[r.channel] += 1
                    elif r.state == OutboxState.DEFERRED.value:
                        deferred[r.channel] += 1
                    if r.channel and r.content and len(rep.samples) < prepared.options.samples:
                        content = decode_contents(r.content).get(r.channel)
                        if content is not None and not any(s.channel == r.channel for s in rep.samples):
                            rep.samples.append(_sample(r.member_id, r.channel, content))
            finally:
                tx.rollback()
    rep.by_state, rep.by_reason, rep.would_send, rep.deferred = dict(state), dict(reason), dict(send), dict(deferred)
    return rep


def _run_row_in(conn: Connection, prepared: PreparedRun) -> int:
    r = CampaignRun.__table__
    now = utcnow()
    spec = prepared.spec
    conn.execute(insert_for(conn, r).on_conflict_do_nothing(index_elements=["campaign", "occurrence"]), dict(
        campaign=spec.campaign, occurrence=spec.occurrence, purpose=spec.purpose.value, priority=spec.priority,
        as_of=prepared.as_of, status=RunStatus.PLANNED.value, error_budget=spec.error_budget, counts="{}",
        created_at=now, updated_at=now))
    return conn.execute(sa.select(r.c.id).where(r.c.campaign == spec.campaign,
                                                r.c.occurrence == spec.occurrence)).scalar_one()


def _short(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _sample(member_id: int, channel: str, content: Content) -> RenderedSample:
    if isinstance(content, EmailContent):
        return RenderedSample(member_id, channel, content.subject, _short(content.text), "email")
    if isinstance(content, SmsContent):
        return RenderedSample(member_id, channel, content.body.split("\n", 1)[0][:80], _short(content.body),
                              f"{content.encoding}, {content.segments} segment(s)")
    if isinstance(content, PushContent):
        return RenderedSample(member_id, channel, content.title, _short(content.body), "push")
    return RenderedSample(member_id, channel, "", "", type(content).__name__)


# -------------------------------------------------------------------------------------------- dispatch


@dataclass
class DispatchOutcome:
    run_id: int
    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    status: str = ""
    stop_reason: str | None = None
    next_due_at: datetime | None = None
    recovered_unknown: int = 0
    elapsed: float = 0.0

    def merge(self, other: "DispatchOutcome") -> "DispatchOutcome":
        out = Counter(self.outcomes)
        out.update(other.outcomes)
        due = [d for d in (self.next_due_at, other.next_due_at) if d is not None]
        return DispatchOutcome(self.run_id or other.run_id, self.attempts + other.attempts, dict(out),
                               other.status or self.status, other.stop_reason or self.stop_reason,
                               min(due) if due else None, self.recovered_unknown + other.recovered_unknown,
                               max(self.elapsed, other.elapsed))


def dispatch_round(engine: Engine, run_id: int, adapters: Mapping[str, ChannelAdapter], *, config=None,
                   resume: bool = False, limiters: Mapping[str, Any] | None = None, records=None,
                   worker_id: str | None = None) -> DispatchOutcome:
    """One dispatcher pass over the run: send every due row, return when nothing is due (or it stopped).

    ``limiters`` replaces the dispatcher's per-channel token buckets (e.g. limits shared between workers
    through the orchestrator); objects need ``acquire()``, ``reserve()`` and ``pause(seconds)``.
    Raises ``ConfigurationError`` (bad credentials) and ``RunPaused``; never per-message errors.
    """
    from membercare.delivery.dispatcher import Dispatcher

    d = Dispatcher(engine, {str(Channel(k).value): v for k, v in adapters.items()}, config=config,
                   records=records, worker_id=worker_id)
    if limiters:
        d.limiters.update({str(Channel(k).value): v for k, v in limiters.items()})
    rep = d.dispatch(run_id, resume=resume)
    return DispatchOutcome(run_id, rep.attempts, dict(rep.outcomes), rep.status, rep.stop_reason, rep.next_due_at,
                           rep.recovered_unknown, rep.elapsed)


def run_progress(engine: Engine, run_id: int) -> tuple[int, int]:
    """(settled, to send): rows no longer waiting to be sent vs rows that were meant to be sent."""
    o = OutboxMessage.__table__
    with engine.connect() as conn:
        counts = dict(conn.execute(sa.select(o.c.state, sa.func.count()).where(o.c.run_id == run_id)
                                   .group_by(o.c.state)).all())
    total = sum(n for s, n in counts.items() if s not in (OutboxState.SKIPPED.value, OutboxState.SUPPRESSED.value))
    waiting = sum(counts.get(s, 0) for s in (OutboxState.PLANNED.value, OutboxState.DEFERRED.value,
                                             OutboxState.SENDING.value))
    return total - waiting, total


# ------------------------------------------------------------------------------------------- summarise


@dataclass
class RunSummary:
    """The run in numbers (from the ledger, so it also covers earlier passes and other workers)."""

    campaign: str
    occurrence: str
    run_id: int | None
    status: str
    segment_size: int
    planned: int  # rows in the ledger for this occurrence (every member the run accounted for)
    newly_planned: int  # rows this invocation added
    sent: dict[str, int] = field(default_factory=dict)  # channel -> sent
    deferred: int = 0
    waiting: int = 0  # planned, not yet sent
    unknown: int = 0
    suppressed: dict[str, int] = field(default_factory=dict)  # reason -> n
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> n (holdout, no_consent, frequency_cap...)
    failed: dict[str, int] = field(default_factory=dict)  # reason -> n
    sent_now: int = 0  # accepted by providers during this invocation
    dry_run: bool = False

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    def table(self) -> list[dict[str, Any]]:
        """Rows ``{"metric", "value"}`` for a table artifact or a terminal table."""
        rows: list[tuple[str, Any]] = [("segment size", self.segment_size), ("planned (ledger rows)", self.planned),
                                       ("newly planned", self.newly_planned)]
        for ch in ("email", "sms", "push"):
            rows.append((f"sent via {ch}", self.sent.get(ch, 0)))
        rows += [("sent in this run", self.sent_now), ("deferred", self.deferred), ("waiting", self.waiting),
                 ("unknown", self.unknown)]
        rows += [(f"suppressed: {r}", n) for r, n in sorted(self.suppressed.items())]
        rows += [(f"skipped: {r}", n) for r, n in sorted(self.skipped.items())]
        rows += [(f"failed: {r}", n) for r, n in sorted(self.failed.items())]
        return [{"metric": k, "value": v} for k, v in rows]

    def line(self) -> str:
        """One log line of counts (no personal data)."""
        return (f"{self.campaign}/{self.occurrence}: segment {self.segment_size}, planned {self.planned} "
                f"(+{self.newly_planned}), sent {self.sent_total} ({self.sent_now} now; "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.sent.items())) + f"), deferred {self.deferred}, "
                f"suppressed {sum(self.suppressed.values())}, skipped {sum(self.skipped.values())}, "
                f"failed {sum(self.failed.values())}, unknown {self.unknown}")


def summarise(engine: Engine, run_id: int | None, *, campaign: str, occurrence: str, segment_size: int,
              newly_planned: int = 0, sent_since: datetime | None = None) -> RunSummary:
    """The run's counts from the ledger; ``sent_now`` counts rows sent at or after ``sent_since``.

    Counting from the ledger (not from a dispatcher's report) also covers rows that a provider event
    settled as sent before the dispatcher recorded its own answer, and other workers' sends.
    """
    o, r = OutboxMessage.__table__, CampaignRun.__table__
    s = RunSummary(campaign, occurrence, run_id, "no run", segment_size, 0, newly_planned)
    if run_id is None:
        return s
    if sent_since is not None:
        with engine.connect() as conn:
            s.sent_now = conn.execute(sa.select(sa.func.count()).where(
                o.c.run_id == run_id, o.c.state == OutboxState.SENT.value, o.c.sent_at >= ensure_utc(sent_since))
            ).scalar_one()
    sent, suppressed, skipped, failed = Counter(), Counter(), Counter(), Counter()
    with engine.connect() as conn:
        s.status = conn.execute(sa.select(r.c.status).where(r.c.id == run_id)).scalar_one()
        for state, channel, code, n in conn.execute(
            sa.select(o.c.state, o.c.channel, o.c.reason_code, sa.func.count()).where(o.c.run_id == run_id)
            .group_by(o.c.state, o.c.channel, o.c.reason_code)
        ):
            s.planned += n
            if state == OutboxState.SENT.value:
                sent[channel] += n
            elif state == OutboxState.DEFERRED.value:
                s.deferred += n
            elif state in (OutboxState.PLANNED.value, OutboxState.SENDING.value):
                s.waiting += n
            elif state == OutboxState.UNKNOWN.value:
                s.unknown += n
            elif state == OutboxState.SUPPRESSED.value:
                suppressed[code] += n
            elif state == OutboxState.SKIPPED.value:
                skipped[code] += n
            elif state == OutboxState.FAILED.value:
                failed[code] += n
    s.sent, s.suppressed, s.skipped, s.failed = dict(sent), dict(suppressed), dict(skipped), dict(failed)
    return s


def dry_run_summary(rep: DryRunReport) -> RunSummary:
    """A dry run in the shape of a :class:`RunSummary` (``sent`` = would be sent now)."""
    skipped = {k: v for k, v in rep.by_reason.items()
               if k in ("holdout", "global_control", "no_consent", "no_reachable_channel", "no_allowed_channel", "frequency_cap",
                        "preempted")}
    return RunSummary(rep.campaign, rep.occurrence, None, "dry run", rep.audience_size, rep.considered,
                      sum(rep.by_state.values()), sent=dict(rep.would_send), deferred=sum(rep.deferred.values()),
                      suppressed={"suppressed": rep.by_state.get("suppressed", 0)} if rep.by_state.get("suppressed")
                      else {}, skipped=skipped, dry_run=True)


# ------------------------------------------------------------------------------------------- preview


def write_preview(settings: Settings, campaign: str) -> Path:
    """Render the campaign's gallery page (sample members, preview-only links) to ``$HOME/previews/<campaign>/``."""
    from membercare.rendering.gallery import write_gallery

    return write_gallery(settings.ensure_home() / "previews" / campaign, settings, campaigns=[campaign])


# ------------------------------------------------------------------------------------------- whole run


@dataclass
class CampaignResult:
    summary: RunSummary
    plan: PlanOutcome | None = None
    dispatch: DispatchOutcome | None = None
    dry: DryRunReport | None = None


def run_campaign(engine: Engine, settings: Settings, campaign: Campaign | str, options: RunOptions | None = None,
                 *, adapters: Mapping[str, ChannelAdapter] | None = None, dispatch_config=None,
                 progress: Callable[[str, int, int], None] | None = None) -> CampaignResult:
    """Every stage in one process (scripts, tests, benchmarks); the Prefect flow sequences the same stages.

    Without ``adapters`` the run is planned but not dispatched (rows stay planned for a dispatcher).
    ``progress(stage, done, total)`` is called after each planning batch group and dispatch pass.
    """
    options = options or RunOptions()
    started = utcnow()
    prepared = prepare(settings, campaign, options)
    audience = resolve_audience(engine, prepared)
    if options.dry_run:
        rep = dry_run(engine, prepared, audience)
        return CampaignResult(dry_run_summary(rep), dry=rep)
    run_id = ensure_run(engine, prepared)
    plan = PlanOutcome(run_id)
    renderer = make_renderer(prepared)
    groups = audience.groups()
    for i, group in enumerate(groups, 1):
        plan = plan.merge(plan_group(engine, prepared, group, renderer=renderer))
        if progress:
            progress("plan", i, len(groups))
    outcome = None
    if adapters is not None:
        outcome = dispatch_round(engine, run_id, adapters, config=dispatch_config)
        if progress:
            done, total = run_progress(engine, run_id)
            progress("dispatch", done, total)
    summary = summarise(engine, run_id, campaign=prepared.name, occurrence=prepared.occurrence,
                        segment_size=audience.size, newly_planned=plan.inserted, sent_since=started)
    return CampaignResult(summary, plan, outcome)


# ------------------------------------------------------------------------------------------ event triggers

# Events that start the same campaigns as another event. Post-purchase care counts its delay from the
# order's delivery; a shipping event is accepted too (the due date then uses delivered_at once it is known).
EVENT_ALIASES: dict[str, str] = {"order.shipped": "order.delivered"}


def trigger_events(settings: Settings) -> dict[str, list[str]]:
    """Event name -> campaigns started by it (from the campaigns' ``trigger:``), aliases included."""
    from membercare.campaigns import list_campaigns

    events: dict[str, list[str]] = defaultdict(list)
    for camp in list_campaigns(settings):
        if camp.trigger is not None:
            events[camp.trigger.event].append(camp.name)
    for alias, target in EVENT_ALIASES.items():
        if target in events:
            events.setdefault(alias, list(events[target]))
    return dict(events)


@dataclass(frozen=True)
class TriggeredRun:
    """One campaign to run for one member because of an event; ``due_at`` in the future means not yet."""

    campaign: str
    member_id: int
    options: RunOptions
    due_at: datetime


def find_member(conn: Connection, member: str | int) -> int:
    """A member by external id (``M0000042``) or database id (``42``)."""
    m = Member.__table__
    text = str(member).strip()
    mid = conn.execute(sa.select(m.c.id).where(m.c.external_id == text)).scalar()
    if mid is None and text.isdigit():
        mid = conn.execute(sa.select(m.c.id).where(m.c.id == int(text))).scalar()
    if mid is None:
        raise InputError(f"no member {text!r} (give the external id or the database id)")
    return int(mid)


def plan_trigger(engine: Engine, settings: Settings, event: str, member: str | int, *, order: str | None = None,
                 ref: str | None = None, at: datetime | None = None) -> list[TriggeredRun]:
    """The runs an event starts for one member (one per campaign triggered by ``event``).

    ``at`` is when the event happened (default now). A campaign with ``delay_days`` is due that many days
    later, counted from the order's delivery for order events; the occurrence key is taken from the due
    date, so the daily sweep of the same campaign and this trigger share it (never both send).
    """
    from membercare.errors import UnknownNameError

    events = trigger_events(settings)
    if event not in events:
        raise UnknownNameError("event", event, events)
    at = ensure_utc(at) if at is not None else utcnow()
    with engine.connect() as conn:
        member_id = find_member(conn, member)
        order_row = None
        if order is not None:
            o = Order.__table__
            order_row = conn.execute(sa.select(o.c.external_id, o.c.member_id, o.c.delivered_at, o.c.status)
                                     .where(o.c.external_id == str(order))).first()
            if order_row is None or order_row.member_id != member_id:
                raise InputError(f"member {member} has no order {order!r}")
    out = []
    for name in events[event]:
        camp = load_campaign(name, settings)
        if camp.message_per == "order" and order_row is None:
            raise InputError(f"campaign {name} is about an order: give --order")
        base = (order_row.delivered_at if order_row is not None and order_row.delivered_at else at)
        due = base + timedelta(days=camp.trigger.delay_days if camp.trigger else 0)
        opts = RunOptions(as_of=max(due, at), members=(member_id,),
                          order_ref=order_row.external_id if order_row is not None else None,
                          event_ref=ref or (f"{event}-{order_row.external_id}" if order_row is not None else None),
                          occurrence_at=due)
        out.append(TriggeredRun(name, member_id, opts, due))
    return out


# ---------------------------------------------------------------------------------------- engagement sync


@dataclass
class SyncReport:
    recovered_stale: int = 0
    settled_from_events: int = 0
    reconciled_from_records: int = 0
    left_unknown: int = 0
    requeued: int = 0
    never_received: int = 0  # the provider confirmed it never got them: sent again
    runs_refreshed: int = 0


def sync_engagement(engine: Engine, *, records=None, lease: timedelta = timedelta(minutes=5),
                    grace: timedelta = timedelta(hours=1), lookback: timedelta = timedelta(days=3),
                    now: datetime | None = None) -> SyncReport:
    """Settle messages whose outcome the ledger does not know yet, then refresh the runs' counts.

    1. ``sending`` rows of dead dispatchers become ``unknown`` (:func:`recover_stale`);
    2. unknown, sending and deferred rows that a provider event names (delivered, opened, bounced... carry
       our message id) were accepted: they become ``sent`` (:func:`mark_sent_from_event`), which also
       cancels the retry of a deferred row whose first attempt really went through;
    3. the rest is looked up in ``records`` (a ``ProviderRecords``, e.g. the sandbox, or a ``ProviderVerdicts``
       such as :func:`membercare.delivery.provider_records.provider_records_from_env`, which can also confirm
       that a provider never received a message: those are sent again) and past ``grace`` settled by policy
       (:func:`reconcile_unknown`);
    4. runs updated within ``lookback`` get their state counts refreshed.
    """
    from membercare.delivery.planner import refresh_run_counts
    from membercare.delivery.reconcile import mark_sent_from_event, reconcile_unknown, recover_stale
    from membercare.engagement.models import EngagementEventRow

    now = ensure_utc(now or utcnow())
    rep = SyncReport()
    rep.recovered_stale = recover_stale(engine, lease=lease, now=now).total
    o, e, r = OutboxMessage.__table__, EngagementEventRow.__table__, CampaignRun.__table__
    open_states = (OutboxState.UNKNOWN.value, OutboxState.SENDING.value, OutboxState.DEFERRED.value)
    last = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(o.c.id, o.c.message_id, sa.func.max(e.c.provider_message_id), sa.func.min(e.c.occurred_at))
                .join(e, e.c.message_id == o.c.message_id)
                .where(o.c.state.in_(open_states), o.c.attempts > 0, o.c.id > last)
                .group_by(o.c.id, o.c.message_id).order_by(o.c.id).limit(1000)).all()
        if not rows:
            break
        last = rows[-1][0]
        with engine.begin() as conn:
            for _id, mid, pmid, at in rows:
                rep.settled_from_events += bool(mark_sent_from_event(conn, mid, provider_message_id=pmid, at=at,
                                                                     source="engagement event"))
    rec = reconcile_unknown(engine, records=records, grace=grace, now=now)
    rep.reconciled_from_records, rep.left_unknown, rep.requeued = rec.found_sent, rec.left_unknown, rec.requeued
    rep.never_received = rec.never_received
    with engine.begin() as conn:
        ids = conn.execute(sa.select(r.c.id).where(r.c.updated_at >= now - lookback)).scalars().all()
        for run_id in ids:
            refresh_run_counts(conn, run_id)
        rep.runs_refreshed = len(ids)
    return rep


__all__ = [
    "Audience", "AudienceEntry", "CampaignResult", "DispatchOutcome", "DryRunReport", "PlanOutcome",
    "PlannerRenderer", "PreparedRun", "RenderFailed", "RenderedSample", "RunOptions", "RunSummary", "SyncReport",
    "EVENT_ALIASES", "TriggeredRun", "find_member", "plan_trigger", "trigger_events",
    "coupon_code", "dispatch_round", "dry_run", "dry_run_summary", "ensure_run", "holdout_rate_for",
    "issue_offer_coupons", "make_assigner", "make_plan_hooks", "make_renderer", "occurrence_key", "plan_group", "prepare",
    "planning_processes", "recipients_for_batch", "resolve_audience", "run_campaign", "run_progress",
    "segment_params_for", "shutdown_planning_pools", "summarise", "sync_engagement", "write_preview",
]
