"""SQL pieces the report sections share: the tables, groups of event kinds, the period's scope, conditional
aggregates and the local calendar bucket of a timestamp."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.db import is_sqlite
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import GLOBAL_CONTROL, HOLDOUT
from membercare.engagement.attribution_models import Attribution
from membercare.engagement.events import EventKind
from membercare.engagement.models import EngagementEventRow
from membercare.reports.options import ReportOptions

OB, E, A = OutboxMessage.__table__, EngagementEventRow.__table__, Attribution.__table__

DELIVERED = (EventKind.DELIVERED.value, EventKind.PUSH_RECEIVED.value)
OPENED = (EventKind.OPENED.value, EventKind.PUSH_OPENED.value)
CLICKED = (EventKind.CLICKED.value,)
OPTED_OUT = (EventKind.UNSUBSCRIBED.value, EventKind.COMPLAINED.value)
# A visit: the member followed a link (any message, or a site visit recorded without one) or tapped a push.
VISITED = (EventKind.CLICKED.value, EventKind.PUSH_OPENED.value)
CONTROLS = (HOLDOUT, GLOBAL_CONTROL)


def scope(options: ReportOptions, table: sa.FromClause = OB) -> list[sa.ColumnElement[bool]]:
    """Outbox rows scheduled in ``[since, until)`` (of ``options.campaign`` when one is given)."""
    cond = [table.c.scheduled_at >= options.since, table.c.scheduled_at < options.until]
    if options.campaign:
        cond.append(table.c.campaign == options.campaign)
    return cond


def flag(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """1 when ``condition`` holds for any row of the group, else 0."""
    return sa.func.max(sa.case((condition, 1), else_=0))


def sum_if(condition: sa.ColumnElement[bool], value: Any = 1) -> sa.ColumnElement[Any]:
    """The sum of ``value`` over the group's rows where ``condition`` holds (0 when none does)."""
    return sa.func.coalesce(sa.func.sum(sa.case((condition, value), else_=0)), 0)


def _utc_offset_minutes(tz: str, at: datetime) -> int:
    off = at.astimezone(ZoneInfo(tz)).utcoffset() or timedelta(0)
    return int(off.total_seconds() // 60)


def bucket_expr(conn: Connection, col: Any, options: ReportOptions) -> sa.ColumnElement[Any]:
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
