"""The audience of a campaign occurrence: who the run is for, as keys only (never contact data).

:func:`resolve_audience` evaluates, at the run's ``as_of``, the campaign's segment (``segments/``, in SQL,
streamed), an explicit member list (event triggers), or the orders delivered ``delay_days`` before the
run's shop-local date (post-purchase campaigns). The result holds member ids, plus the coupon code or the
order reference a message is about where the campaign sends one message per coupon or per order.

**Snapshots.** With ``snapshot=True`` a segment audience is not held in memory: one ``INSERT ... SELECT``
writes its keys to ``audience_snapshots`` (numbered in member order), and :meth:`Audience.groups` hands out
:class:`AudiencePage` bounds that a planning task loads itself. The process that resolves the audience
then holds a few integers whatever the audience's size, and every group of one run reads the same
audience even if members join the segment meanwhile. :meth:`Audience.release` deletes the rows when the
run is over; rows of a run that died are swept by the next resolve after :data:`SNAPSHOT_TTL`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.campaigns.occurrence import DEFAULT_BATCH_SIZE, PreparedRun
from membercare.errors import InputError
from membercare.models import Member, Order, OrderStatus
from membercare.timeutil import UTC, utcnow
from segments.base import Ref
from segments.base import context as segment_context
from segments.base import count as segment_count
from segments.base import ref as segment_ref

DEFAULT_GROUP_SIZE = 20_000  # members per planning task in the flow (a few seconds of work)


SNAPSHOT_TTL = timedelta(days=2)  # a snapshot older than this belongs to a run that died: swept

_SNAPSHOTS = sa.table("audience_snapshots", sa.column("snapshot", sa.String), sa.column("seq", sa.Integer),
                      sa.column("member_id", sa.Integer), sa.column("coupon_codes", sa.Text))


@dataclass(frozen=True)
class AudienceEntry:
    """One message's worth of audience: a member, and the coupon or order it is about (if any)."""

    member_id: int
    coupon_code: str | None = None
    order_ref: str | None = None


@dataclass(frozen=True)
class AudiencePage:
    """Entries ``first`` to ``last`` (inclusive, numbered from 1 in member order) of a snapshot audience."""

    snapshot: str
    first: int
    last: int
    per_coupon: bool = False

    def __len__(self) -> int:
        return self.last - self.first + 1

    def load(self, engine: Engine) -> list[AudienceEntry]:
        """The page's entries, in member order (one indexed range read)."""
        s = _SNAPSHOTS
        stmt = (sa.select(s.c.member_id, s.c.coupon_codes)
                .where(s.c.snapshot == self.snapshot, s.c.seq >= self.first, s.c.seq <= self.last)
                .order_by(s.c.seq))
        with engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [AudienceEntry(int(r[0]), coupon_code=_first_coupon(r[1]) if self.per_coupon else None)
                for r in rows]


def entries_of(engine: Engine, group: Sequence[AudienceEntry] | AudiencePage) -> Sequence[AudienceEntry]:
    """A group's entries: the group itself, or a snapshot page read from the database."""
    return group.load(engine) if isinstance(group, AudiencePage) else group


@dataclass
class Audience:
    """Who the run is for: keys only (member ids, coupon codes, order references), never contact data.

    ``size`` is the full segment size; the run's entries may be cut by ``RunOptions.limit``. A snapshot
    audience (``snapshot`` set) keeps its ``count`` entries in the database, not in ``entries``.
    """

    size: int
    entries: list[AudienceEntry]
    source: str  # "segment birthday_today(...)", "members", "orders delivered on 2026-11-16"
    snapshot: str | None = None
    count: int = 0
    per_coupon: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return self.count if self.snapshot is not None else len(self.entries)

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE,
                engine: Engine | None = None) -> Iterator[Sequence[AudienceEntry]]:
        """Consecutive batches of entries (a snapshot audience reads each from ``engine``)."""
        if self.snapshot is not None:
            if engine is None:
                raise ValueError("a snapshot audience is read from the database: pass the engine")
            for page in self.pages(batch_size):
                yield page.load(engine)
            return
        for i in range(0, len(self.entries), batch_size):
            yield self.entries[i:i + batch_size]

    def pages(self, size: int) -> list[AudiencePage]:
        """The snapshot's entries as pages of ``size`` (bounds only)."""
        if self.snapshot is None:
            raise ValueError("pages exist for a snapshot audience only")
        return [AudiencePage(self.snapshot, first, min(first + size - 1, self.count), self.per_coupon)
                for first in range(1, self.count + 1, size)]

    def groups(self, group_size: int = DEFAULT_GROUP_SIZE) -> list[Sequence[AudienceEntry] | AudiencePage]:
        """Consecutive slices for parallel or separately retried planning (one flow task each): lists of
        entries, or page bounds of a snapshot audience (see :func:`entries_of`)."""
        if self.snapshot is not None:
            return list(self.pages(group_size))
        return [self.entries[i:i + group_size] for i in range(0, len(self.entries), group_size)]

    def release(self, engine: Engine) -> None:
        """Delete a snapshot audience's rows (the run is over). Idempotent; nothing to do for a list."""
        if self.snapshot is None:
            return
        with engine.begin() as conn:
            conn.execute(sa.delete(_SNAPSHOTS).where(_SNAPSHOTS.c.snapshot == self.snapshot))


def resolve_audience(engine: Engine, prepared: PreparedRun, *, snapshot: bool = False) -> Audience:
    """Evaluate the campaign's audience for ``prepared.as_of``: a segment, explicit members, or due orders.

    ``snapshot=True`` writes a segment audience to the database instead of returning its entries (see the
    module docstring); call :meth:`Audience.release` when the run is over. Explicit members and due orders
    (at most a day's deliveries) stay in memory either way.
    """
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
        return _segment_snapshot(engine, prepared) if snapshot else _segment_audience(engine, prepared)
    if camp.trigger is not None and camp.trigger.event == "order.delivered":
        return _delivered_orders_audience(engine, prepared)
    raise InputError(f"campaign {camp.name} is started by the event {camp.trigger.event if camp.trigger else '?'}: "
                     f"use `membercare trigger` for one member")


def _limit(entries: list[AudienceEntry], limit: int | None) -> list[AudienceEntry]:
    return entries if limit is None else entries[:limit]


def _segment_name(prepared: PreparedRun) -> str:
    if prepared.campaign.segment is None:  # resolve_audience comes here only for a segment campaign
        raise InputError(f"campaign {prepared.name} has no segment")
    return prepared.campaign.segment.name


def _segment(prepared: PreparedRun) -> Ref:
    return segment_ref(_segment_name(prepared), **prepared.segment_params)


def _segment_audience(engine: Engine, prepared: PreparedRun) -> Audience:
    seg = _segment(prepared)
    per_coupon = prepared.campaign.per_coupon
    limit = prepared.options.limit
    entries: list[AudienceEntry] = []
    with engine.connect() as conn:
        ctx = segment_context(conn, prepared.as_of, prepared.settings.shop_timezone)
        size = segment_count(ctx, seg)
        q = seg.select(ctx).subquery()
        cols = [q.c.member_id]
        if per_coupon:
            if "coupon_codes" not in q.c:
                raise InputError(f"campaign {prepared.name} sends one message per coupon but segment "
                                 f"{_segment_name(prepared)} does not list coupons")
            cols.append(q.c.coupon_codes)
        stmt = sa.select(*cols).order_by(q.c.member_id)
        if limit is not None:
            stmt = stmt.limit(limit)
        # Streamed (server-side cursor on PostgreSQL); only keys are kept.
        result = conn.execute(stmt, execution_options={"yield_per": 10_000})
        for part in result.partitions(10_000):
            for row in part:
                entries.append(AudienceEntry(int(row[0]), coupon_code=_first_coupon(row[1]) if per_coupon else None))
    return Audience(size, entries, _label(prepared))


def _first_coupon(codes: str | None) -> str | None:
    # The segment lists a member's coupons soonest-expiring first; the message is about that one (the template
    # shows the others too), and the coupon joins the idempotency key.
    return (codes or "").split(",")[0].strip() or None


def _label(prepared: PreparedRun) -> str:
    label = f"segment {_segment_name(prepared)}"
    if prepared.segment_params:
        label += "(" + ", ".join(f"{k}={v}" for k, v in sorted(prepared.segment_params.items())) + ")"
    return label


def _segment_snapshot(engine: Engine, prepared: PreparedRun) -> Audience:
    """The segment's keys written to ``audience_snapshots`` in one set-based statement (no rows in Python)."""
    seg = _segment(prepared)
    per_coupon = prepared.campaign.per_coupon
    now = utcnow()
    name = f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(6)}"
    s = _SNAPSHOTS
    with engine.begin() as conn:
        # Names start with their creation time, so one range delete sweeps what dead runs left.
        conn.execute(sa.delete(s).where(s.c.snapshot < f"{now - SNAPSHOT_TTL:%Y%m%dT%H%M%S}"))
        ctx = segment_context(conn, prepared.as_of, prepared.settings.shop_timezone)
        size = segment_count(ctx, seg)
        q = seg.select(ctx).subquery()
        if per_coupon and "coupon_codes" not in q.c:
            raise InputError(f"campaign {prepared.name} sends one message per coupon but segment "
                             f"{_segment_name(prepared)} does not list coupons")
        codes = q.c.coupon_codes if per_coupon else sa.null()
        inner = sa.select(q.c.member_id.label("member_id"), codes.label("coupon_codes")).order_by(q.c.member_id)
        if prepared.options.limit is not None:
            inner = inner.limit(prepared.options.limit)
        sub = inner.subquery()
        seq = sa.func.row_number().over(order_by=sub.c.member_id)
        conn.execute(sa.insert(s).from_select(
            ["snapshot", "seq", "member_id", "coupon_codes"],
            sa.select(sa.literal(name, sa.String), seq, sub.c.member_id, sub.c.coupon_codes)))
        # Counted, not the statement's rowcount: a driver may report -1 for INSERT ... SELECT.
        written = conn.execute(sa.select(sa.func.count()).select_from(s).where(s.c.snapshot == name)).scalar_one()
    return Audience(size, [], _label(prepared), snapshot=name, count=int(written), per_coupon=per_coupon)


def _delivered_orders_audience(engine: Engine, prepared: PreparedRun) -> Audience:
    """Members whose order was delivered ``delay_days`` before the run's shop-local date (one per member)."""
    tz = ZoneInfo(prepared.settings.shop_timezone)
    trigger = prepared.campaign.trigger
    if trigger is None:  # resolve_audience comes here only for an order.delivered campaign
        raise InputError(f"campaign {prepared.name} has no trigger")
    delay = trigger.delay_days
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


__all__ = ["DEFAULT_GROUP_SIZE", "SNAPSHOT_TTL", "Audience", "AudienceEntry", "AudiencePage", "entries_of",
           "resolve_audience"]
