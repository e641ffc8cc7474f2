"""Time conventions: every stored timestamp is UTC and timezone-aware in Python.

SQLite has no timezone-aware type, so :class:`UTCDateTime` stores naive UTC there and attaches
UTC on the way out; PostgreSQL uses ``timestamptz``. Either way the application only ever sees
aware UTC datetimes, and a naive datetime handed to the database is a bug we refuse loudly.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def ensure_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: membercare stores timezone-aware UTC only")
    return value.astimezone(UTC)


def shop_today(tz: str, now: datetime | None = None) -> date:
    """The shop's calendar date (campaigns, segments and reports count days in the shop's zone, not UTC)."""
    return (now or utcnow()).astimezone(ZoneInfo(tz)).date()


def shop_date_label(value: datetime, tz: str, *, with_time: bool = True) -> str:
    """A timestamp as a person at the shop reads it: ``2026-11-23 10:00 Asia/Taipei`` (or just the date)."""
    local = ensure_utc(value).astimezone(ZoneInfo(tz))
    return f"{local:%Y-%m-%d %H:%M} {tz}" if with_time else f"{local:%Y-%m-%d}"


def parse_as_of(text: str | None, tz: str = "UTC") -> datetime:
    """Parse a CLI ``--as-of``: a date (start of that day in ``tz``) or an ISO datetime.

    A naive datetime is read in ``tz``; the result is aware UTC. ``None`` means now.
    """
    if text is None:
        return utcnow()
    text = text.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime.combine(d, time(0), ZoneInfo(tz)).astimezone(UTC)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not a date or ISO datetime: {text!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return dt.astimezone(UTC)


def valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


class UTCDateTime(TypeDecorator[datetime]):
    """Aware-UTC datetimes on every backend (``timestamptz`` on PostgreSQL, naive UTC text on SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = ensure_utc(value)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
