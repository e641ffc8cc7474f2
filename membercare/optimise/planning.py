"""Optimisation at planning time: the planner's ``assign``, ``prefer`` and ``deliver_at`` hooks of a run.

:func:`build_hooks` turns a campaign's ``optimise:`` block (``membercare.campaigns.Optimise``) and the
global-control settings into the three extension points of :func:`membercare.delivery.planner.plan_run`
(``runner.make_plan_hooks`` calls it, for real runs and dry runs alike):

* ``assign`` (:class:`Assigner`): global control group (marketing only), then the campaign holdout, then
  the template variant from the occurrence's stored shares (:func:`allocation_for`).
* ``prefer`` (:class:`BestEngagement`, ``routing: best_engagement``): the consented, reachable channel
  with the highest Thompson draw from the member's Beta posterior first.
* ``deliver_at`` (:class:`BestHour`, ``send_time: best_hour``): the next instant at the member's best
  local hour within 24 hours, inside allowed hours.

Everything learnt from history is aggregated in SQL (``GROUP BY``, streamed with a server-side cursor on
PostgreSQL), never loaded as one Python object per event, and kept in compact sorted numpy arrays of the
members who have history. The loads are cached per process for a few minutes, keyed by database, kind
and ``as_of``, so the planning groups of one run (one ``make_plan_hooks`` call each) share them.
Formulas, defaults and assumptions: ``docs/optimisation.md`` (sections 3-5 and 8).
"""

from __future__ import annotations

import json
import random
import threading
import time as _time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field, SQLModel

from membercare.db import insert_for, is_sqlite
from membercare.delivery.models import CampaignRun, OutboxMessage, OutboxState
from membercare.delivery.planner import GLOBAL_CONTROL, HOLDOUT, Recipient
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.delivery.routing import CHANNELS, MemberContext, check_channel
from membercare.engagement.attribution_models import Attribution, AttributionModel
from membercare.engagement.events import EventKind
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import PURCHASE_STATUSES, Member, Order, Purpose
from membercare.optimise import assignment, bandit, channel_choice, send_time
from membercare.timeutil import UTCDateTime, ensure_utc, utcnow

DEFAULT_LOOKBACK = timedelta(days=365)
# Click-level engagement: what best_engagement and the click goal count (opens are inflated by mail
# privacy proxies and do not exist for SMS, so they would not compare channels fairly).
CLICK_KINDS = (EventKind.CLICKED.value, EventKind.PUSH_OPENED.value)
OPEN_KINDS = (EventKind.OPENED.value, *CLICK_KINDS)
CACHE_SECONDS = 600.0
CACHE_ENTRIES = 6
STREAM_ROWS = 20_000
CHANNEL_DOMAIN = "channel"  # assignment key domain of the per-member Thompson draw


class VariantAllocation(SQLModel, table=True):
    """The template-variant shares of one campaign occurrence (migration ``0007_variants``).

    Written once, when the occurrence is first planned (first writer wins), so that every planning
    group, rerun and resume gives each member the same variant. ``report`` is the bandit's
    :class:`~membercare.optimise.bandit.BanditReport` as JSON (posterior, P(best) and share per variant);
    ``reason`` says how the shares were decided (uniform start, bandit, promoted winner).
    """

    __tablename__ = "variant_allocations"
    __table_args__ = (
        sa.UniqueConstraint("campaign", "occurrence", name="uq_variant_allocations_occurrence"),
        sa.Index("ix_variant_allocations_campaign_as_of", "campaign", "as_of"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"))
    campaign: str = Field(max_length=64)
    occurrence: str = Field(max_length=64)
    as_of: datetime = Field(sa_type=UTCDateTime, nullable=False)
    goal: str = Field(max_length=16)
    names: str = Field(max_length=200, description="comma-separated variant names, control first")
    shares: str = Field(sa_type=sa.Text, description="JSON {variant: share}")
    winner: str | None = Field(default=None, max_length=32)
    reason: str = Field(max_length=500)
    report: str = Field(sa_type=sa.Text, description="JSON of the BanditReport")
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False, default_factory=utcnow)


# ------------------------------------------------------------------------------------------------ cache

_cache: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
_cache_lock = threading.Lock()


def _cached(key: Hashable, load: Callable[[], Any]) -> Any:
    """``load()`` once per key for :data:`CACHE_SECONDS` (a few entries; statistics of one run)."""
    now = _time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            _cache.move_to_end(key)
            return hit[1]
    value = load()
    with _cache_lock:
        _cache[key] = (now, value)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return value


def clear_cache() -> None:
    """Forget cached statistics (tests, or a long-lived process after importing history)."""
    with _cache_lock:
        _cache.clear()


def _engine_key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Allocation:
    """The variant shares of one occurrence and how they were decided."""

    campaign: str
    occurrence: str
    names: tuple[str, ...]
    shares: dict[str, float]
    winner: str | None
    reason: str
    report: dict
    stored: bool  # False for a dry run's allocation that was not written


def variant_stats(conn: Connection, campaign: str, names: Sequence[str], goal: str,
                  before: datetime) -> list[bandit.VariantStats]:
    """Sends and goal successes per variant over the campaign's occurrences planned for before ``before``.

    Two ``GROUP BY variant`` queries: sends over the earlier runs' outbox rows in state sent (holdout and
    control rows are never sent, so never counted), and successes, which start from the (far fewer)
    successes: for ``click`` the messages with a clicked or push_opened event, joined to their outbox row;
    for ``conversion`` the messages credited with a conversion by last-touch attribution.
    """
    o, r = OutboxMessage.__table__, CampaignRun.__table__
    earlier = sa.select(r.c.id).where(r.c.campaign == campaign, r.c.as_of < ensure_utc(before))
    names = list(names)
    sends = dict(conn.execute(
        sa.select(o.c.variant, sa.func.count())
        .where(o.c.run_id.in_(earlier), o.c.state == OutboxState.SENT.value, o.c.variant.in_(names))
        .group_by(o.c.variant)).all())
    if goal == "click":
        e = EngagementEventRow.__table__
        clicked = sa.select(e.c.message_id).where(e.c.kind.in_(CLICK_KINDS)).distinct().subquery("clicked")
        successes = sa.select(o.c.variant, sa.func.count()).select_from(
            clicked.join(o, o.c.message_id == clicked.c.message_id)).where(
            o.c.run_id.in_(earlier), o.c.state == OutboxState.SENT.value, o.c.variant.in_(names))
    elif goal == "conversion":
        a = Attribution.__table__
        successes = sa.select(a.c.variant, sa.func.count(sa.distinct(a.c.message_id))).where(
            a.c.model == AttributionModel.LAST_TOUCH.value, a.c.campaign == campaign, a.c.run_id.in_(earlier),
            a.c.variant.in_(names))
    else:
        raise InputError(f"unknown variant goal {goal!r}; valid: click, conversion")
    wins = dict(conn.execute(successes.group_by(successes.selected_columns[0])).all())
    return [bandit.VariantStats(n, int(sends.get(n, 0)), min(int(wins.get(n, 0)), int(sends.get(n, 0))))
            for n in names]


def compute_allocation(conn: Connection, campaign: str, occurrence: str, as_of: datetime, test, *,
                       min_sends: int = bandit.DEFAULT_MIN_SENDS, draws: int = bandit.DEFAULT_DRAWS) -> Allocation:
    """The shares of a new occurrence: the promoted winner of an earlier occurrence with the same variant
    names (promotion is final), else the bandit over the earlier occurrences (uniform without data)."""
    names = tuple(test.names)
    va = VariantAllocation.__table__
    prev = conn.execute(
        sa.select(va.c.occurrence, va.c.winner, va.c.report).where(
            va.c.campaign == campaign, va.c.as_of < ensure_utc(as_of), va.c.winner.is_not(None),
            va.c.names == ",".join(names))
        .order_by(va.c.as_of.desc()).limit(1)
    ).first()
    if prev is not None and prev.winner in names:
        shares = {n: 1.0 if n == prev.winner else 0.0 for n in names}
        return Allocation(campaign, occurrence, names, shares, prev.winner,
                          f"winner {prev.winner} promoted in occurrence {prev.occurrence}", json.loads(prev.report),
                          False)
    stats = variant_stats(conn, campaign, names, test.goal, as_of)
    rep = bandit.allocate(stats, goal=test.goal, floor=test.floor, threshold=test.promote_at, min_sends=min_sends,
                          draws=draws, seed=bandit.seed_for(campaign, occurrence))
    p_best = {v.name: v.p_best for v in rep.variants}
    if rep.winner is not None:
        reason = f"promoted {rep.winner}: P(best) {p_best[rep.winner]:.3f} >= {test.promote_at}"
    elif sum(s.sends for s in stats) == 0:
        reason = "first occurrence (no sends of earlier occurrences): uniform"
    else:
        reason = "bandit: P(best) " + ", ".join(f"{n} {p_best[n]:.3f}" for n in names) + f", floor {test.floor}"
        if rep.notes:
            reason += "; " + "; ".join(rep.notes)
    return Allocation(campaign, occurrence, names, {n: float(rep.shares[n]) for n in names}, rep.winner,
                      reason[:500], rep.to_dict(), False)


def _from_row(row) -> Allocation:
    return Allocation(row.campaign, row.occurrence, tuple(row.names.split(",")), json.loads(row.shares), row.winner,
                      row.reason, json.loads(row.report), True)


def stored_allocation(conn: Connection, campaign: str, occurrence: str) -> Allocation | None:
    va = VariantAllocation.__table__
    row = conn.execute(sa.select(va).where(va.c.campaign == campaign, va.c.occurrence == occurrence)).first()
    return None if row is None else _from_row(row)


def allocation_for(engine: Engine, campaign: str, occurrence: str, as_of: datetime, test, *, store: bool = True,
                   min_sends: int = bandit.DEFAULT_MIN_SENDS) -> Allocation:
    """The occurrence's variant shares: the stored ones, else computed now and stored (first writer wins).

    ``store=False`` (dry runs) computes without writing. Raises :class:`InputError` when the occurrence was
    allocated for other variant names than the campaign now declares (finish it, or run a new occurrence).
    """
    names = tuple(test.names)
    with engine.connect() as conn:
        got = stored_allocation(conn, campaign, occurrence)
        if got is None:
            got = compute_allocation(conn, campaign, occurrence, as_of, test, min_sends=min_sends)
    if got.stored or not store:
        if got.names != names:
            raise InputError(f"{campaign}/{occurrence} was allocated for variants {', '.join(got.names)} but the "
                             f"campaign now declares {', '.join(names)}: finish that occurrence with its variants, "
                             f"or run a new occurrence (occurrence tag)")
        return got
    va = VariantAllocation.__table__
    with engine.begin() as conn:
        conn.execute(insert_for(conn, va).on_conflict_do_nothing(index_elements=["campaign", "occurrence"]), dict(
            campaign=campaign, occurrence=occurrence, as_of=ensure_utc(as_of), goal=test.goal, names=",".join(names),
            shares=json.dumps(got.shares, sort_keys=True), winner=got.winner, reason=got.reason,
            report=json.dumps(got.report, sort_keys=True), created_at=utcnow()))
        stored = stored_allocation(conn, campaign, occurrence)
    if stored is None:  # pragma: no cover - the row was just inserted or already there
        raise InputError(f"{campaign}/{occurrence}: the variant allocation could not be stored")
    if stored.names != names:
        raise InputError(f"{campaign}/{occurrence} was allocated concurrently for variants {', '.join(stored.names)}")
    return stored


# ------------------------------------------------------------------------------------------------ assign


class Assigner:
    """The planner's ``assign`` hook: global control, campaign holdout, template variant (in that order).

    A picklable callable; every decision is a pure function of the member id and the run's constants.
    """

    def __init__(self, campaign: str, occurrence: str, *, holdout_rate: float = 0.0, control_rate: float = 0.0,
                 control_salt: str = "membercare", shares: Mapping[str, float] | None = None):
        self.campaign, self.occurrence = campaign, occurrence
        self.holdout_rate, self.control_rate, self.control_salt = holdout_rate, control_rate, control_salt
        self.shares = dict(shares) if shares else None
        self._setup()

    def _setup(self) -> None:
        self._control = (assignment.key_prefix(assignment.CONTROL, self.control_salt),
                         assignment.threshold(self.control_rate)) if self.control_rate > 0 else None
        self._holdout = (assignment.key_prefix(assignment.HOLDOUT, self.campaign),
                         assignment.threshold(self.holdout_rate)) if self.holdout_rate > 0 else None
        self._pick = assignment.variant_picker(self.campaign, self.occurrence, self.shares) if self.shares else None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_control", "_holdout", "_pick")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    def __call__(self, ctx: MemberContext | None, rc: Recipient) -> str | None:
        mid = str(rc.member_id)
        if self._control is not None and assignment.bucket_of_text(self._control[0] + mid) < self._control[1]:
            return GLOBAL_CONTROL
        if self._holdout is not None and assignment.bucket_of_text(self._holdout[0] + mid) < self._holdout[1]:
            return HOLDOUT
        return self._pick(mid) if self._pick is not None else None


def in_control_or_holdout(member_ids: Sequence[int], campaign: str, *, holdout_rate: float, control_rate: float,
                          control_salt: str) -> list[int]:
    """The members of ``member_ids`` that :class:`Assigner` records without a message (no offer coupon for them)."""
    a = Assigner(campaign, "-", holdout_rate=holdout_rate, control_rate=control_rate, control_salt=control_salt)
    return [m for m in member_ids if a(None, Recipient(int(m))) in (HOLDOUT, GLOBAL_CONTROL)]


# ------------------------------------------------------------------------------------- history helpers


def _utc_hour(conn: Connection, col):
    """The UTC hour of the day (0-23) of a UTCDateTime column, in SQL."""
    if is_sqlite(conn):
        return sa.cast(sa.func.strftime("%H", col), sa.Integer)  # naive UTC text on SQLite
    return sa.cast(sa.extract("hour", sa.func.timezone("UTC", col)), sa.Integer)


def _group_key(age_group, tier) -> tuple[str | None, str | None]:
    return (age_group or None, tier or None)


def _zone_offset_hours(tz: str | None, at: datetime, fallback: str) -> int:
    """The member zone's UTC offset at ``at`` in whole hours (nearest), for converting UTC hour bins."""
    try:
        zone = ZoneInfo(tz or fallback)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo(fallback)
    off = ensure_utc(at).astimezone(zone).utcoffset()
    return int(np.floor(off.total_seconds() / 3600.0 + 0.5)) if off is not None else 0


def _streamed(conn: Connection, stmt, rows: int | None = None):
    """Result partitions of ``stmt`` (a server-side cursor on PostgreSQL)."""
    rows = rows or STREAM_ROWS
    return conn.execute(stmt, execution_options={"yield_per": rows}).partitions(rows)


# ------------------------------------------------------------------------------------- best channel


@dataclass
class ChannelHistory:
    """Marketing messages sent and click-level engagements per member and channel (members with history).

    ``member_ids`` is sorted; row ``i`` of ``sends``/``engagements`` belongs to ``member_ids[i]``; columns
    follow :data:`membercare.delivery.routing.CHANNELS`. ``rates[g]`` is the shrunk rate of group ``g``
    (``groups`` maps ``(age_group, tier)`` to it); the last row holds each channel's overall rate.
    """

    member_ids: np.ndarray
    sends: np.ndarray
    engagements: np.ndarray
    groups: dict[tuple[str | None, str | None], int]
    rates: np.ndarray
    channels: tuple[str, ...] = CHANNELS

    def row(self, member_id: int) -> int | None:
        i = int(np.searchsorted(self.member_ids, member_id))
        return i if i < self.member_ids.size and self.member_ids[i] == member_id else None

    def rate_row(self, age_group, tier) -> np.ndarray:
        return self.rates[self.groups.get(_group_key(age_group, tier), self.rates.shape[0] - 1)]

    @property
    def nbytes(self) -> int:
        return self.member_ids.nbytes + self.sends.nbytes + self.engagements.nbytes + self.rates.nbytes


def load_channel_history(conn: Connection, as_of: datetime, *, lookback: timedelta = DEFAULT_LOOKBACK,
                         group_strength: float = channel_choice.DEFAULT_GROUP_STRENGTH) -> ChannelHistory:
    """Two streamed aggregates over the marketing messages sent in ``[as_of - lookback, as_of)``.

    1. Sends per member and channel (one scan of the outbox), ordered by member and folded partition by
       partition into the final sorted arrays, so memory is the result plus one partition.
    2. Click-level engagements per member and channel: click events joined to their message (far fewer
       rows than messages), added into the same arrays (an engaged message is a sent one).

    Group totals are summed from the same rows. Nothing per event or per message reaches Python.
    """
    as_of = ensure_utc(as_of)
    o, e, m = OutboxMessage.__table__, EngagementEventRow.__table__, Member.__table__
    sent = (o.c.state == OutboxState.SENT.value, o.c.purpose == Purpose.MARKETING.value, o.c.channel.is_not(None),
            o.c.sent_at >= as_of - lookback, o.c.sent_at < as_of)
    cols = (o.c.member_id, m.c.age_group, m.c.tier, o.c.channel)
    sends_q = (sa.select(*cols, sa.func.count()).select_from(o.join(m, m.c.id == o.c.member_id))
               .where(*sent).group_by(*cols).order_by(o.c.member_id))
    clicked = sa.select(e.c.message_id).where(e.c.kind.in_(CLICK_KINDS)).distinct().subquery("clicked")
    engaged_q = (sa.select(*cols, sa.func.count())
                 .select_from(clicked.join(o, o.c.message_id == clicked.c.message_id).join(m, m.c.id == o.c.member_id))
                 .where(*sent).group_by(*cols))
    C = len(CHANNELS)
    chan_index = {c: i for i, c in enumerate(CHANNELS)}
    groups: dict[tuple, int] = {}

    def columns(part) -> tuple[np.ndarray, ...]:
        n = len(part)
        mid, ch, gs, cnt = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        for i, (member_id, age_group, tier, channel, count) in enumerate(part):
            mid[i], ch[i], cnt[i] = member_id, chan_index[channel], count
            gs[i] = groups.setdefault(_group_key(age_group, tier), len(groups))
        return mid, ch, gs, cnt

    def add_group_totals(target: list[np.ndarray], gs: np.ndarray, ch: np.ndarray, cnt: np.ndarray) -> None:
        while len(target) < len(groups):
            target.append(np.zeros(C))
        for g in np.unique(gs):
            sel = gs == g
            target[int(g)] += np.bincount(ch[sel], weights=cnt[sel], minlength=C)

    member_parts: list[np.ndarray] = []
    send_parts: list[np.ndarray] = []
    g_sends: list[np.ndarray] = []
    for part in _streamed(conn, sends_q):
        mid, ch, gs, cnt = columns(part)
        add_group_totals(g_sends, gs, ch, cnt)
        members, inv = np.unique(mid, return_inverse=True)
        S = np.zeros((members.size, C), np.int32)
        np.add.at(S, (inv, ch), cnt)
        if member_parts and member_parts[-1][-1] == members[0]:  # a member straddling two partitions
            send_parts[-1][-1] += S[0]
            members, S = members[1:], S[1:]
        member_parts.append(members)
        send_parts.append(S)
    members = np.concatenate(member_parts) if member_parts else np.zeros(0, np.int64)
    S = np.concatenate(send_parts) if send_parts else np.zeros((0, C), np.int32)
    del member_parts, send_parts
    E = np.zeros_like(S)
    g_engaged: list[np.ndarray] = []
    for part in _streamed(conn, engaged_q):
        mid, ch, gs, cnt = columns(part)
        add_group_totals(g_engaged, gs, ch, cnt)
        if not members.size:
            continue
        idx = np.minimum(np.searchsorted(members, mid), members.size - 1)
        ok = members[idx] == mid
        np.add.at(E, (idx[ok], ch[ok]), cnt[ok])
    E = np.minimum(E, S)  # a message counted once per side; guards against a send/click race at the window's edge
    G = len(groups)
    GN = np.vstack(g_sends + [np.zeros(C)] * (G - len(g_sends))) if G else np.zeros((0, C))
    GE = np.vstack(g_engaged + [np.zeros(C)] * (G - len(g_engaged))) if G else np.zeros((0, C))
    GE = np.minimum(GE, GN)
    rates = np.vstack([channel_choice.rates_from_totals(GN, GE, group_strength=group_strength),
                       channel_choice.overall_rates(GN, GE)[None, :]])
    return ChannelHistory(members, S, E, groups, rates)


class BestEngagement:
    """The planner's ``prefer`` hook for ``routing: best_engagement``.

    Candidates: the channels the member listed, that the campaign allows and that routing accepts now
    (consent for the purpose, reachable, not suppressed). Each gets one draw from the member's Beta
    posterior ``Beta(κ·r + e (+w on the member's first stated channel), κ·(1-r) + n - e)`` with a
    generator seeded by (campaign, occurrence, member), so a rerun reorders identically; the best
    candidate is moved to the front of the member's own list. Routing still checks every channel.
    """

    def __init__(self, history: ChannelHistory, *, campaign: str, occurrence: str, purpose: str,
                 allowed: Sequence[str], prior_strength: float = channel_choice.DEFAULT_PRIOR_STRENGTH,
                 preference_weight: float = channel_choice.DEFAULT_PREFERENCE_WEIGHT):
        self.history, self.purpose, self.allowed = history, str(purpose), frozenset(str(c) for c in allowed)
        self.kappa, self.weight = float(prior_strength), float(preference_weight)
        self.prefix = assignment.key_prefix(CHANNEL_DOMAIN, campaign, occurrence)
        self.index = {c: i for i, c in enumerate(history.channels)}
        # Per-member work is plain Python on small lists (numpy's per-call overhead would dominate).
        rates = np.clip(history.rates, 1e-6, 1 - 1e-6)
        self._group_rates = {g: rates[i].tolist() for g, i in history.groups.items()}
        self._overall = rates[-1].tolist()
        self._rng = random.Random()

    def candidates(self, ctx: MemberContext) -> list[str]:
        return [c for c in dict.fromkeys(ctx.preferred)
                if c in self.allowed and c in self.index and check_channel(ctx, c, self.purpose) is None]

    def posterior(self, ctx: MemberContext, channels: Sequence[str]) -> list[tuple[float, float]]:
        """``(alpha, beta)`` of each channel for this member."""
        h = self.history
        row = ctx.row or {}
        r = self._group_rates.get(_group_key(row.get("age_group"), row.get("tier")), self._overall)
        i = h.row(ctx.member_id)
        sends = h.sends[i].tolist() if i is not None else None
        engaged = h.engagements[i].tolist() if i is not None else None
        first = ctx.preferred[0] if ctx.preferred else None
        out = []
        for c in channels:
            j = self.index[c]
            n = sends[j] if sends is not None else 0
            e = engaged[j] if engaged is not None else 0
            alpha = self.kappa * r[j] + e + (self.weight if c == first else 0.0)
            out.append((alpha, self.kappa * (1.0 - r[j]) + n - e))
        return out

    def __call__(self, ctx: MemberContext, rc: Recipient) -> Sequence[str] | None:
        cands = self.candidates(ctx)
        if len(cands) < 2:
            return None  # nothing to choose: routing takes the member's own order
        rng = self._rng
        rng.seed(assignment.bucket_of_text(self.prefix + str(rc.member_id)))
        draws = [rng.betavariate(a, b) for a, b in self.posterior(ctx, cands)]
        best = cands[max(range(len(draws)), key=draws.__getitem__)]
        return (best, *(c for c in ctx.preferred if c != best))


# ---------------------------------------------------------------------------------------- best hour


@dataclass
class HourHistory:
    """Best local send hours: per member with enough history, else per ``(age_group, tier)`` group."""

    member_ids: np.ndarray  # sorted; members with at least ``min_events`` weighted events
    hours: np.ndarray  # int8, aligned with member_ids
    groups: dict[tuple[str | None, str | None], int]
    group_hours: np.ndarray  # per group; the last entry is the population's typical hour
    allowed: send_time.AllowedHours
    has_data: bool

    def hour_for(self, member_id: int, age_group=None, tier=None) -> tuple[int, str]:
        """``(hour, source)``: the member's own best hour, else their group's, else the population's."""
        i = int(np.searchsorted(self.member_ids, member_id))
        if i < self.member_ids.size and self.member_ids[i] == member_id:
            return int(self.hours[i]), "member"
        g = self.groups.get(_group_key(age_group, tier))
        if g is None:
            return int(self.group_hours[-1]), "population" if self.has_data else "default"
        return int(self.group_hours[g]), "segment" if self.has_data else "default"

    @property
    def nbytes(self) -> int:
        return self.member_ids.nbytes + self.hours.nbytes + self.group_hours.nbytes


def _hour_events(conn: Connection, as_of: datetime, lookback: timedelta, weights: Mapping[str, float]):
    """Weighted activity rows (member_id, UTC hour, weight): opens, clicks and push taps, purchases."""
    e, od = EngagementEventRow.__table__, Order.__table__
    since = as_of - lookback
    w_open, w_click, w_buy = (float(weights.get(k, 1.0)) for k in ("open", "click", "purchase"))
    events = sa.select(
        e.c.member_id.label("member_id"), _utc_hour(conn, e.c.occurred_at).label("h"),
        sa.case((e.c.kind == EventKind.OPENED.value, w_open), else_=w_click).label("w"),
    ).where(e.c.kind.in_(OPEN_KINDS), e.c.member_id.is_not(None), e.c.occurred_at >= since, e.c.occurred_at < as_of)
    orders = sa.select(
        od.c.member_id.label("member_id"), _utc_hour(conn, od.c.placed_at).label("h"),
        sa.literal(w_buy, sa.Float).label("w"),
    ).where(od.c.status.in_([s.value if hasattr(s, "value") else s for s in PURCHASE_STATUSES]),
            od.c.placed_at >= since, od.c.placed_at < as_of)
    return sa.union_all(events, orders).subquery("activity")


def load_hour_history(conn: Connection, as_of: datetime, *, allowed: send_time.AllowedHours,
                      fallback_timezone: str = "Asia/Taipei", lookback: timedelta = DEFAULT_LOOKBACK,
                      weights: Mapping[str, float] | None = None, min_events: float = send_time.DEFAULT_MIN_EVENTS,
                      prior_weight: float = send_time.DEFAULT_PRIOR_WEIGHT,
                      bandwidth: float = send_time.DEFAULT_BANDWIDTH, chunk_members: int = 10_000) -> HourHistory:
    """Best hours in two set-based passes (see docs/optimisation.md, section 8).

    1. ``GROUP BY age group, tier, timezone, UTC hour``: the groups' local-hour profiles (small).
    2. ``GROUP BY member, ..., UTC hour ORDER BY member``, streamed: members are scored in chunks of
       ``chunk_members`` with those profiles; only the best hour of members with at least ``min_events``
       weighted events is kept.
    """
    as_of = ensure_utc(as_of)
    weights = send_time.DEFAULT_WEIGHTS if weights is None else weights
    m = Member.__table__
    act = _hour_events(conn, as_of, lookback, weights)
    offsets: dict[str | None, int] = {}

    def offset(tz: str | None) -> int:
        if tz not in offsets:
            offsets[tz] = _zone_offset_hours(tz, as_of, fallback_timezone)
        return offsets[tz]

    groups: dict[tuple, int] = {}
    totals: list[np.ndarray] = []
    for age_group, tier, tz, h, w in conn.execute(
        sa.select(m.c.age_group, m.c.tier, m.c.timezone, act.c.h, sa.func.sum(act.c.w))
        .select_from(act.join(m, m.c.id == act.c.member_id))
        .group_by(m.c.age_group, m.c.tier, m.c.timezone, act.c.h)
    ):
        g = groups.setdefault(_group_key(age_group, tier), len(groups))
        if g == len(totals):
            totals.append(np.zeros(send_time.HOURS))
        totals[g][(int(h) + offset(tz)) % send_time.HOURS] += float(w or 0)
    # The last row stays empty: members of a group nobody in it has history for get the population profile.
    T = np.vstack([*totals, np.zeros(send_time.HOURS)]) if totals else np.zeros((1, send_time.HOURS))
    profiles = send_time.profiles_from_totals(T, allowed=allowed, bandwidth=bandwidth)

    kept_ids: list[np.ndarray] = []
    kept_hours: list[np.ndarray] = []
    buf: list[tuple] = []

    def score(rows: list[tuple]) -> None:
        mids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        members, inv = np.unique(mids, return_inverse=True)
        hours = np.fromiter(((int(r[4]) + offset(r[3])) % send_time.HOURS for r in rows), np.int64, len(rows))
        hist = np.zeros((members.size, send_time.HOURS))
        np.add.at(hist, (inv, hours), np.fromiter((float(r[5] or 0) for r in rows), float, len(rows)))
        seg = np.full(members.size, T.shape[0] - 1, np.int64)
        seg[inv] = [groups.get(_group_key(r[1], r[2]), T.shape[0] - 1) for r in rows]
        res = send_time.best_hours(hist, seg, allowed=allowed, bandwidth=bandwidth, prior_weight=prior_weight,
                                   min_events=min_events, profiles=profiles)
        own = res.events >= min_events
        kept_ids.append(members[own])
        kept_hours.append(res.hour[own].astype(np.int8))

    stmt = (sa.select(act.c.member_id, m.c.age_group, m.c.tier, m.c.timezone, act.c.h, sa.func.sum(act.c.w))
            .select_from(act.join(m, m.c.id == act.c.member_id))
            .group_by(act.c.member_id, m.c.age_group, m.c.tier, m.c.timezone, act.c.h)
            .order_by(act.c.member_id))
    distinct = 0
    for part in _streamed(conn, stmt):
        for r in part:
            if not buf or buf[-1][0] != r[0]:
                distinct += 1
                if distinct > chunk_members:
                    score(buf)
                    buf, distinct = [], 1
            buf.append(tuple(r))
    if buf:
        score(buf)
    ids = np.concatenate(kept_ids) if kept_ids else np.zeros(0, np.int64)
    hrs = np.concatenate(kept_hours) if kept_hours else np.zeros(0, np.int8)
    return HourHistory(ids, hrs, groups, profiles.hour.astype(np.int8), allowed, profiles.has_data)


def allowed_hours(policy: PolicySettings) -> send_time.AllowedHours:
    """The whole local hours outside the policy's quiet hours (the whole day without quiet hours)."""
    qh = policy.quiet_hours
    return send_time.AllowedHours.outside(qh.start, qh.end) if qh is not None else send_time.AllowedHours(0, 24)


class BestHour:
    """The planner's ``deliver_at`` hook for ``send_time: best_hour``.

    The next instant at the member's best local hour (their own, else their group's typical hour) at
    or after ``as_of``: ``as_of`` itself when the member is inside that hour now (sent as usual), else
    within 24 hours (the planner defers the row with reason ``send_time``).
    """

    def __init__(self, history: HourHistory, *, as_of: datetime, fallback_timezone: str = "Asia/Taipei"):
        self.history, self.as_of, self.fallback = history, ensure_utc(as_of), fallback_timezone
        self._at: dict[tuple[str, int], datetime] = {}

    def zone_name(self, tz: str | None) -> str:
        try:
            return ZoneInfo(tz).key if tz else self.fallback
        except (ZoneInfoNotFoundError, ValueError):
            return self.fallback

    def __call__(self, ctx: MemberContext, rc: Recipient, first_channel: str) -> datetime | None:
        row = ctx.row or {}
        hour, _ = self.history.hour_for(ctx.member_id, row.get("age_group"), row.get("tier"))
        key = (self.zone_name(ctx.timezone), hour)
        at = self._at.get(key)
        if at is None:
            at = self._at[key] = send_time.next_delivery_at(self.as_of, key[0], hour)
        return at


# ------------------------------------------------------------------------------------------- building


def build_hooks(engine: Engine, prepared, *, policy: PolicySettings | None = None) -> dict[str, Any]:
    """The planner hooks of a prepared run (``runner.PreparedRun``): ``assign``, ``prefer``, ``deliver_at``.

    ``assign`` is None when there is nothing to assign (no holdout, no control group, no variants);
    ``prefer`` / ``deliver_at`` are present only when the campaign opts in. A dry run
    (``prepared.options.dry_run``) computes variant shares without storing them.
    """
    camp, settings = prepared.campaign, prepared.settings
    opt = camp.optimise
    marketing = Purpose(camp.purpose) == Purpose.MARKETING
    control_rate = float(settings.global_control_rate) if marketing else 0.0
    shares = None
    if opt.variants is not None:
        alloc = allocation_for(engine, prepared.name, prepared.occurrence, prepared.as_of, opt.variants,
                               store=not prepared.options.dry_run)
        shares = alloc.shares
    hooks: dict[str, Any] = {"assign": None}
    if prepared.holdout_rate > 0 or control_rate > 0 or shares:
        hooks["assign"] = Assigner(prepared.name, prepared.occurrence, holdout_rate=prepared.holdout_rate,
                                   control_rate=control_rate, control_salt=settings.global_control_salt, shares=shares)
    if opt.routing == "best_engagement" or opt.send_time == "best_hour":
        if policy is None:
            with engine.connect() as conn:
                policy = load_policy(conn)
    url = _engine_key(engine)
    if opt.routing == "best_engagement":
        def load_channels() -> ChannelHistory:
            with engine.connect() as conn:
                return load_channel_history(conn, prepared.as_of)

        history = _cached((url, "channels", prepared.as_of), load_channels)
        hooks["prefer"] = BestEngagement(history, campaign=prepared.name, occurrence=prepared.occurrence,
                                         purpose=Purpose(camp.purpose).value, allowed=prepared.spec.channels)
    if opt.send_time == "best_hour":
        allowed = allowed_hours(policy)

        def load_hours() -> HourHistory:
            with engine.connect() as conn:
                return load_hour_history(conn, prepared.as_of, allowed=allowed,
                                         fallback_timezone=policy.fallback_timezone)

        hours = _cached((url, "hours", prepared.as_of, allowed), load_hours)
        hooks["deliver_at"] = BestHour(hours, as_of=prepared.as_of, fallback_timezone=policy.fallback_timezone)
    return hooks


__all__ = [
    "Allocation", "Assigner", "BestEngagement", "BestHour", "ChannelHistory", "HourHistory", "VariantAllocation",
    "allocation_for", "allowed_hours", "build_hooks", "clear_cache", "compute_allocation", "in_control_or_holdout",
    "load_channel_history", "load_hour_history", "stored_allocation", "variant_stats",
]
