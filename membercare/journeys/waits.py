"""When a wait step ends: after a duration, at the next time of day in the member's zone, or at a date
attribute (``birthday``'s next anniversary, or ``context.<key>`` of the entry event) shifted by ``offset_days``
at the step's time of day. A date already past ends the wait at once (with the reason)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Connection

from membercare.journeys.conditions import InstanceView, attribute_value
from membercare.journeys.definition import Wait, parse_duration
from membercare.timeutil import UTC, valid_timezone


def _clock_time(text: str) -> time:
    h, m = text.split(":")
    return time(int(h), int(m))


def next_time_of_day(now: datetime, at: str, zone: str) -> datetime:
    """The first ``at`` (HH:MM) in ``zone`` strictly after ``now``."""
    tz = ZoneInfo(zone)
    local = now.astimezone(tz)
    cand = datetime.combine(local.date(), _clock_time(at), tz)
    if cand <= local:
        cand = datetime.combine(local.date() + timedelta(days=1), _clock_time(at), tz)
    return cand.astimezone(UTC)


def _anniversary(d: date, today: date) -> date:
    for year in (today.year, today.year + 1):
        try:
            cand = d.replace(year=year)
        except ValueError:  # 29 February in a common year: the 28th
            cand = date(year, 2, 28)
        if cand >= today:
            return cand
    return cand


def _as_date(value: object) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).date()
        except ValueError:
            return None
    return None


def wait_until(conn: Connection, wait: Wait, inst: InstanceView, now: datetime,
               zone: str) -> tuple[datetime | None, str]:
    """(when the wait ends or None for now, the reason in words)."""
    zone = zone if valid_timezone(zone) else "UTC"
    if wait.duration is not None:
        return now + parse_duration(wait.duration), f"wait {wait.duration}"
    if wait.until_time is not None:
        return next_time_of_day(now, wait.until_time, zone), f"until {wait.until_time} in the member's zone"
    assert wait.until_date is not None
    value = _as_date(attribute_value(conn, inst, wait.until_date))
    if value is None:
        return None, f"{wait.until_date} is not set: no wait"
    tz = ZoneInfo(zone)
    today = now.astimezone(tz).date()
    if wait.until_date == "birthday":
        value = _anniversary(value, today - timedelta(days=wait.offset_days))
    day = value + timedelta(days=wait.offset_days)
    until = datetime.combine(day, _clock_time(wait.at), tz).astimezone(UTC)
    if until <= now:
        return None, f"{wait.until_date} {wait.offset_days:+d}d is past: no wait"
    return until, f"until {wait.until_date} {wait.offset_days:+d}d at {wait.at}"


__all__ = ["next_time_of_day", "wait_until"]
