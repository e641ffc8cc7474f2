"""One injected clock for tests that need an instant.

A test that compares fixed dates with times it got from the real clock rots with the calendar: data
seeded "yesterday" by the real clock is, a few weeks later, newer than a fixed statement the test
makes on purpose. Tests therefore take every instant from one :class:`Clock` (the ``clock``
fixture in ``conftest.py``), hand it to seed helpers (``seed_members(..., now=clock())``) and to
the code under test (``Dispatcher(..., clock=clock)``), and move it only when they say so.

Tests that talk to real services whose timestamps are checked against the wall clock (webhook
signatures, the sandbox's event times) may use the real clock instead, but then read it once and
pass that instant everywhere, never mixing it with fixed dates.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# Monday 2026-11-23, 12:00 in Asia/Taipei: outside SMS quiet hours (21:00-09:00) in the shop's timezone.
FROZEN_NOW = datetime(2026, 11, 23, 4, tzinfo=UTC)


class Clock:
    """A callable returning an aware UTC datetime that only moves when told (``advance`` or ``set``)."""

    def __init__(self, start: datetime = FROZEN_NOW):
        self._now = self._checked(start)

    @staticmethod
    def _checked(at: datetime) -> datetime:
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"naive datetime {at!r}: the test clock holds aware UTC instants")
        return at.astimezone(UTC)

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | None = None, **kwargs: float) -> datetime:
        """Move forward by ``delta`` or ``timedelta(**kwargs)``; returns the new instant."""
        self._now += delta if delta is not None else timedelta(**kwargs)
        return self._now

    def set(self, at: datetime) -> datetime:
        self._now = self._checked(at)
        return self._now

    def __repr__(self) -> str:
        return f"Clock({self._now.isoformat()})"
