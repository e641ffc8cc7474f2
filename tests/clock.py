"""One injected clock for tests that need an instant.

A test that compares fixed dates with times it got from the real clock rots with the calendar: data
seeded "yesterday" by the real clock is, a few weeks later, newer than a fixed statement the test
makes on purpose. Tests therefore take every instant from one :class:`Clock` (the ``clock``
fixture in ``conftest.py``), hand it to seed helpers (``seed_members(..., now=clock())``) and to
the code under test (``Dispatcher(..., clock=clock)``), and move it only when they say so.

Tests that talk to real services whose timestamps are checked against the wall clock (webhook
signatures, the sandbox's event times) may use the real clock instead, but then read it once and
pass that instant everywhere, never mixing it with fixed dates.

Running the suite at a chosen wall clock
----------------------------------------
``pytest --wall-clock 23:59`` (or ``MEMBERCARE_TEST_WALL_CLOCK=23:59``) moves the real clock of the
test process with time-machine: the session starts there, and each test starts again at that
instant, with time running on from it (``tick=True``), so a one-minute test begun at 23:59 crosses
midnight in Asia/Taipei. ``WHEN`` is ``HH:MM[:SS]`` (today's date in Asia/Taipei), a naive ISO
datetime (read in Asia/Taipei) or an aware one (``2026-11-23T23:59:00+08:00``); see
:func:`parse_wall_clock`. A test that passes at 23:59 and at 03:00 (inside SMS quiet hours, and on
either side of a date change) does not depend on the hour or the date.

What the travel reaches: everything in the test process that reads the wall clock
(``datetime.now``, ``time.time``, ``date.today``, ``utcnow``), the in-process sandbox and receiver
included, and every Python child process that inherits the environment: conftest.py puts
``tests/wall_clock_child`` on ``PYTHONPATH``, whose ``sitecustomize`` moves the child's clock by the
running test's offset (``WALL_CLOCK_TRAVEL_OFFSET_S``). So the dispatcher processes, the CLI runs
and the planning pool's workers see the same moved time as the test. Without that, an in-process
sandbox at 23:59 would refuse a child's FCM OAuth assertion signed at the real time ("Token must be
a short-lived token ... in a reasonable timeframe"), and a child's report would see the test's
events in its future.

A black-box test of a command that reads the wall clock by design chooses the child's instant itself
with :func:`env_with_clock_at`: ``test_demo.py`` runs ``membercare demo`` twice at ``FROZEN_NOW``
(the second run continuing where the first ended), because "a second run the same day sends nothing"
needs both runs on the same day, which a run started at 23:59 would not give it.

What it does not reach:

* ``time.monotonic`` and ``perf_counter`` (timeouts and rate limiters keep real durations), and the
  processes' local timezone (left as it is).
* a child started with an environment that drops ``PYTHONPATH`` (only test_assignment's hash-seed
  check, which reads no time) or run by an interpreter without time-machine (its sitecustomize says
  so on stderr).
* PostgreSQL's ``now()`` and SQLite's ``CURRENT_TIMESTAMP``: the code never stamps rows with them.
* Prefect's API server (``prefect_test_harness``'s subprocess, and the ephemeral server the demo
  starts) stays on the real clock on purpose: it computes rate-limit slot decay in SQL against its
  database's ``now()`` from timestamps its Python writes, and with the two apart the shared rate
  limits never free a slot. The flow engine in the test process runs at the moved time against it,
  so flow tests assert on what the flows did, not on when Prefect's server says it happened.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

SHOP_TZ = ZoneInfo("Asia/Taipei")

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


_TIME_OF_DAY = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_wall_clock(text: str, today: date | None = None) -> datetime:
    """The instant ``--wall-clock WHEN`` names, as an aware UTC datetime.

    ``HH:MM[:SS]`` is that time on ``today`` (default: today's date in Asia/Taipei) in Asia/Taipei; a
    naive ISO datetime is read in Asia/Taipei; an aware one is taken as it is.
    """
    text = text.strip()
    try:
        if m := _TIME_OF_DAY.match(text):
            day = today or datetime.now(SHOP_TZ).date()
            at = datetime.combine(day, time(*(int(g or 0) for g in m.groups())), SHOP_TZ)
        else:
            at = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if at.tzinfo is None:
                at = at.replace(tzinfo=SHOP_TZ)
    except ValueError as exc:
        raise ValueError(f"--wall-clock: not HH:MM[:SS] or an ISO datetime: {text!r}") from exc
    return at.astimezone(UTC)


CHILD_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wall_clock_child")
OFFSET_ENV = "WALL_CLOCK_TRAVEL_OFFSET_S"


def real_time() -> float:
    """The real clock's Unix time, also while time-machine moves ``time.time``."""
    import time

    import time_machine

    return time_machine.escape_hatch.time.time() if time_machine.escape_hatch.is_travelling() else time.time()


def env_with_clock_at(env: dict[str, str], at: datetime) -> dict[str, str]:
    """``env`` for a Python child process whose wall clock starts at ``at`` and runs on from there.

    For black-box tests of commands that read the wall clock by design (``membercare demo`` runs "today"):
    the test chooses the instant instead of inheriting the hour and the date it happens to run at. Works
    with and without ``--wall-clock`` (tests/wall_clock_child/sitecustomize.py does the moving).
    """
    offset = Clock._checked(at).timestamp() - real_time()
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join([CHILD_SITE, *[x for x in out.get("PYTHONPATH", "").split(os.pathsep)
                                                       if x and x != CHILD_SITE]])
    out[OFFSET_ENV] = repr(offset)
    return out
