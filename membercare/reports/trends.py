"""Trends: messages sent, engagement, opt-outs and credited conversions per day or ISO week in the shop's
timezone; every bucket of the range is present (a quiet day shows as zero)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import OutboxState
from membercare.engagement.attribution_models import ConversionType
from membercare.engagement.events import EventKind, InboundCommand
from membercare.reports.options import ReportOptions
from membercare.reports.sql import CLICKED, DELIVERED, OB, OPENED, OPTED_OUT, A, E, bucket_expr, sum_if


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



def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def trends(conn: Connection, options: ReportOptions) -> list[TrendPoint]:
    points: dict[date, TrendPoint] = {}

    def point(bucket: Any) -> TrendPoint:
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
        b, sa.func.count(sa.distinct(sa.case((E.c.kind.in_(DELIVERED), E.c.message_id)))),
        sa.func.count(sa.distinct(sa.case((E.c.kind.in_(OPENED), E.c.message_id)))),
        sa.func.count(sa.distinct(sa.case((E.c.kind.in_(CLICKED), E.c.message_id)))),
        sum_if(sa.or_(E.c.kind.in_(OPTED_OUT),
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

