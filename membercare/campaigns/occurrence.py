"""One occurrence of a campaign: its options, its occurrence key, and the prepared run that every stage takes.

A run is a sequence of stages, each a plain function with typed inputs and outputs, so that the Prefect
flow (``flows/campaign.py``) only sequences them (one task per stage or per group of batches) and tests,
benchmarks and scripts can call them directly (``membercare.campaigns.run.run_campaign`` runs them all in
one process)::

    prepared = prepare(settings, "birthday", RunOptions(as_of=...))    # occurrence.py: key, spec, pre-flight check
    audience = resolve_audience(engine, prepared)                    # audience.py: member keys (no PII)
    for group in audience.groups(20_000):
        plan_group(engine, prepared, group)                          # plan.py: coupons, rendering, outbox rows
    outcome = dispatch_round(engine, run_id, adapters)               # dispatch.py: send what is due
    summary = summarise(engine, run_id, ...)                         # summary.py: counts from the ledger

**Occurrence keys** come from the campaign's ``occurrence`` granularity in the *shop's* time zone
(``hourly`` ``2026-11-23T09``, ``daily`` ``2026-11-23``, ``weekly`` ``2026-W48``, ``monthly`` ``2026-11``,
``once`` ``once``), optionally suffixed with a tag (``RunOptions.occurrence_tag``) when one campaign has
several schedules that must not share a key (the coupon-expiry reminders three days and one day ahead).
Event-triggered campaigns (``trigger:``) key on the event: ``message_per: order`` campaigns on the local
date the message is due (delivery date + ``delay_days``), so the daily sweep and an explicit trigger for
the same order can never both send; other triggered campaigns on the event reference when one is given
(``review-R123``), else on the day. The key is part of every outbox row's idempotency key, so a rerun of
any stage, or of the whole run, sends nothing twice.

**Holdouts**: marketing campaigns hold out ``params.holdout_rate`` of the audience (default 10 %,
``membercare.optimise.assignment``; stable per campaign across occurrences). Held-out members get an
outbox row in state ``skipped`` with reason ``holdout``, no message and no offer coupon, so lift can be
measured against them. Transactional campaigns are never held out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from membercare.campaigns.definition import Campaign, load_campaign
from membercare.config import Settings
from membercare.delivery.planner import PlanSpec
from membercare.errors import InputError
from membercare.models import Channel, Purpose
from membercare.optimise import assignment
from membercare.rendering.check import ensure_campaign_ready
from membercare.timeutil import ensure_utc, utcnow

DEFAULT_BATCH_SIZE = 1000  # members per planning batch (one transaction)
MAX_PROCESSES = 64  # planning worker processes at most (RunOptions.processes)


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


def _valid_tag(tag: str) -> bool:
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


# A real send's as_of may run ahead of this machine's clock by this much (another host's clock, a schedule
# computed a moment early); anything later is a date that has not happened yet.
FUTURE_AS_OF_TOLERANCE = timedelta(minutes=5)


def refuse_future_as_of(options: RunOptions, now: datetime | None = None) -> None:
    """Refuse a real send whose ``as_of`` lies in the future.

    Segments are evaluated at ``as_of``: a future one selects members for a day that has not come (birthday
    greetings three days early, reminders for coupons that are not about to expire) and sends them now.
    A dry run may look ahead; a real send waits for its day (the schedule runs it then).
    """
    if options.dry_run or options.as_of is None:
        return
    now = now or utcnow()
    if ensure_utc(options.as_of) > now + FUTURE_AS_OF_TOLERANCE:
        raise InputError(f"as_of {ensure_utc(options.as_of).isoformat()} is in the future (now "
                         f"{now.isoformat(timespec='seconds')}): a real send would message members for a day that "
                         "has not come yet; preview it with --dry-run, or let the schedule run it on that day")


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
        ensure_campaign_ready(camp.name, settings)
    spec = PlanSpec(campaign=camp.name, occurrence=occurrence, purpose=Purpose(camp.purpose), channels=channels,
                    priority=camp.priority, auto_resume_after_s=camp.auto_resume_after)
    return PreparedRun(campaign=camp, spec=spec, as_of=as_of, occurrence=occurrence,
                       holdout_rate=holdout_rate_for(camp, options.holdout_rate),
                       segment_params=segment_params_for(camp, options.segment_params), options=options,
                       settings=settings)


__all__ = ["DEFAULT_BATCH_SIZE", "FUTURE_AS_OF_TOLERANCE", "MAX_PROCESSES", "PreparedRun", "RunOptions",
           "holdout_rate_for", "occurrence_key", "refuse_future_as_of",
           "prepare", "segment_params_for"]
