"""Engagement history aggregated for planning-time optimisation: who engages on which channel, and when.

:func:`load_channel_history` (sends and click-level engagements per member and channel, for
``routing: best_engagement``) and :func:`load_hour_history` (best local send hours, for
``send_time: best_hour``) are the two reads of history that :mod:`membercare.optimise.hooks` turns into
planner hooks.

Everything learnt from history is aggregated in SQL (``GROUP BY``, streamed with a server-side cursor on
PostgreSQL), never loaded as one Python object per event, and kept in compact sorted numpy arrays of the
members who have history. :func:`cached_channel_history` and :func:`cached_hour_history` keep the loads
for a few minutes per process, keyed by database, kind and ``as_of``, so the planning groups of one run
(one ``build_hooks`` call each) share them. Formulas, defaults and assumptions: ``docs/optimisation.md``
(sections 3-5 and 8).
"""

from __future__ import annotations

import threading
import time as _time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import is_sqlite
from membercare.delivery.models import OutboxMessage, OutboxState
from membercare.delivery.routing import CHANNELS
from membercare.engagement.events import EventKind
from membercare.engagement.models import EngagementEventRow
from membercare.models import PURCHASE_STATUSES, Member, Order, Purpose
from membercare.optimise import channel_choice, send_time
from membercare.timeutil import ensure_utc

DEFAULT_LOOKBACK = timedelta(days=365)
# Click-level engagement: what best_engagement and the click goal count (opens are inflated by mail
# privacy proxies and do not exist for SMS, so they would not compare channels fairly).
CLICK_KINDS = (EventKind.CLICKED.value, EventKind.PUSH_OPENED.value)
OPEN_KINDS = (EventKind.OPENED.value, *CLICK_KINDS)
CACHE_SECONDS = 600.0
CACHE_ENTRIES = 6
STREAM_ROWS = 20_000


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


# ------------------------------------------------------------------------------------------------ helpers


def _utc_hour(conn: Connection, col: sa.ColumnElement) -> sa.ColumnElement[int]:
    """The UTC hour of the day (0-23) of a UTCDateTime column, in SQL."""
    if is_sqlite(conn):
        return sa.cast(sa.func.strftime("%H", col), sa.Integer)  # naive UTC text on SQLite
    return sa.cast(sa.extract("hour", sa.func.timezone("UTC", col)), sa.Integer)


def group_key(age_group: str | None, tier: str | None) -> tuple[str | None, str | None]:
    """The key of a member's ``(age_group, tier)`` group in the histories (blank values count as unknown)."""
    return (age_group or None, tier or None)


def _zone_offset_hours(tz: str | None, at: datetime, fallback: str) -> int:
    """The member zone's UTC offset at ``at`` in whole hours (nearest), for converting UTC hour bins."""
    try:
        zone = ZoneInfo(tz or fallback)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo(fallback)
    off = ensure_utc(at).astimezone(zone).utcoffset()
    return int(np.floor(off.total_seconds() / 3600.0 + 0.5)) if off is not None else 0


def _streamed(conn: Connection, stmt: sa.Select, rows: int | None = None) -> Iterator[Sequence[sa.Row]]:
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

    def rate_row(self, age_group: str | None, tier: str | None) -> np.ndarray:
        return self.rates[self.groups.get(group_key(age_group, tier), self.rates.shape[0] - 1)]

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
            gs[i] = groups.setdefault(group_key(age_group, tier), len(groups))
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


def cached_channel_history(engine: Engine, as_of: datetime) -> ChannelHistory:
    """:func:`load_channel_history` at ``as_of``, cached per database and ``as_of`` (see :data:`CACHE_SECONDS`)."""
    def load() -> ChannelHistory:
        with engine.connect() as conn:
            return load_channel_history(conn, as_of)

    return _cached((_engine_key(engine), "channels", as_of), load)


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

    def hour_for(self, member_id: int, age_group: str | None = None, tier: str | None = None) -> tuple[int, str]:
        """``(hour, source)``: the member's own best hour, else their group's, else the population's."""
        i = int(np.searchsorted(self.member_ids, member_id))
        if i < self.member_ids.size and self.member_ids[i] == member_id:
            return int(self.hours[i]), "member"
        g = self.groups.get(group_key(age_group, tier))
        if g is None:
            return int(self.group_hours[-1]), "population" if self.has_data else "default"
        return int(self.group_hours[g]), "segment" if self.has_data else "default"

    @property
    def nbytes(self) -> int:
        return self.member_ids.nbytes + self.hours.nbytes + self.group_hours.nbytes


def _hour_events(conn: Connection, as_of: datetime, lookback: timedelta, weights: Mapping[str, float]) -> sa.Subquery:
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
        g = groups.setdefault(group_key(age_group, tier), len(groups))
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
        seg[inv] = [groups.get(group_key(r[1], r[2]), T.shape[0] - 1) for r in rows]
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


def cached_hour_history(engine: Engine, as_of: datetime, *, allowed: send_time.AllowedHours,
                        fallback_timezone: str) -> HourHistory:
    """:func:`load_hour_history` at ``as_of``, cached per database, ``as_of`` and allowed hours."""
    def load() -> HourHistory:
        with engine.connect() as conn:
            return load_hour_history(conn, as_of, allowed=allowed, fallback_timezone=fallback_timezone)

    return _cached((_engine_key(engine), "hours", as_of, allowed), load)


__all__ = [
    "CLICK_KINDS", "DEFAULT_LOOKBACK", "OPEN_KINDS", "ChannelHistory", "HourHistory", "cached_channel_history",
    "cached_hour_history", "clear_cache", "group_key", "load_channel_history", "load_hour_history",
]
