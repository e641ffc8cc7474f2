"""The audience of a campaign occurrence: who the run is for, as keys only (never contact data).

:func:`resolve_audience` evaluates, at the run's ``as_of``, the campaign's segment (``segments/``, in SQL,
streamed), an explicit member list (event triggers), or the orders delivered ``delay_days`` before the
run's shop-local date (post-purchase campaigns). The result holds member ids, plus the coupon code or the
order reference a message is about where the campaign sends one message per coupon or per order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.campaigns.occurrence import DEFAULT_BATCH_SIZE, PreparedRun
from membercare.errors import InputError
from membercare.models import Member, Order, OrderStatus
from membercare.timeutil import UTC
from segments.base import Ref
from segments.base import context as segment_context
from segments.base import count as segment_count
from segments.base import ref as segment_ref

DEFAULT_GROUP_SIZE = 20_000  # members per planning task in the flow (a few seconds of work)


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
                code = None
                if per_coupon:
                    # The segment lists a member's coupons soonest-expiring first; the message is about that one
                    # (the template shows the others too), and the coupon joins the idempotency key.
                    code = (row[1] or "").split(",")[0].strip() or None
                entries.append(AudienceEntry(int(row[0]), coupon_code=code))
    label = f"segment {_segment_name(prepared)}"
    if prepared.segment_params:
        label += "(" + ", ".join(f"{k}={v}" for k, v in sorted(prepared.segment_params.items())) + ")"
    return Audience(size, entries, label)


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


__all__ = ["DEFAULT_GROUP_SIZE", "Audience", "AudienceEntry", "resolve_audience"]
