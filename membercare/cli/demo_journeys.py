"""The demo's journeys: a month of the demo shop's member events replayed on a simulated clock.

At each stop of the clock (:data:`membercare.journeys.demo.CHECKPOINTS`: a month ago, ..., an hour ago, now)
the events up to that instant go in through the ``POST /events`` path and the ``advance-journeys`` flow runs
with ``as_of`` = that instant, so each stop is one flow run in the Prefect UI with its counts as an artifact,
and a newcomer sees instances wait, branch, send and leave as the clock passes their steps. The messages
planned at past stops are sent by the last stop's run (its dispatch takes every journey row still due), through
the sandbox like any other: one dispatch instead of one per stop keeps the demo short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from membercare.cli.common import state


@dataclass
class JourneyStop:
    at: datetime
    label: str
    stored: int
    entered: int
    advanced: dict[str, Any]


@dataclass
class JourneysDemo:
    now: datetime
    stops: list[JourneyStop] = field(default_factory=list)
    funnels: list[Any] = field(default_factory=list)  # membercare.journeys.funnel.Funnel, per journey

    @property
    def sent(self) -> int:
        return sum(int(s.advanced.get("sent", 0)) for s in self.stops)


def _label(back: timedelta) -> str:
    if not back:
        return "now"
    return f"-{back.days} d" if back.days else f"-{back.seconds // 3600} h"


def run_journeys(progress: Any, engine: Any, *, seed: int) -> JourneysDemo:
    """Replay the demo shop's events on the simulated clock, one ``advance-journeys`` flow run per stop."""
    from flows.journeys import advance_journeys
    from membercare.journeys.definition import list_journeys
    from membercare.journeys.demo import CHECKPOINTS, demo_events, post_until
    from membercare.journeys.funnel import funnel
    from membercare.timeutil import utcnow

    now = utcnow()
    journeys = list_journeys(state.settings)
    with engine.connect() as conn:
        events = demo_events(conn, now, seed=seed)
    out = JourneysDemo(now)
    task = progress.add_task("journeys on a simulated clock", total=len(CHECKPOINTS))
    previous = None
    for back in CHECKPOINTS:
        at = now - back
        progress.update(task, description=f"advance-journeys at {_label(back)} (simulated clock)")
        with engine.begin() as conn:
            ingested = post_until(conn, events, journeys, previous, at)
        advanced = advance_journeys(as_of=at, send=not back)
        out.stops.append(JourneyStop(at, _label(back), ingested.stored, ingested.entered, advanced))
        previous = at
        progress.advance(task)
    with engine.connect() as conn:
        out.funnels = [funnel(conn, j.name, now) for j in journeys]
    return out


def print_journeys_summary(console: Console, demo: JourneysDemo) -> None:
    """Two small tables, readable at 80 columns: the clock's stops, then each journey's instances."""
    t = Table(title="Journeys on a simulated clock (a month of the shop's events)")
    for col in ("clock", "events in", "entered", "steps", "messages", "exited", "done"):
        t.add_column(col, justify="left" if col == "clock" else "right")
    for s in demo.stops:
        a = s.advanced
        t.add_row(s.label, f"{s.stored:,}", f"{s.entered:,}", f"{sum(a.get('steps', {}).values()):,}",
                  f"{sum(a.get('sends', {}).values()):,}", f"{sum(a.get('exited', {}).values()):,}",
                  f"{a.get('completed', 0):,}")
    console.print(t)
    console.print(f"  messages: planned by the steps at that stop (any outcome); {demo.sent:,} sent through the "
                  "sandbox by the last stop's dispatch.")
    j = Table(title="Journey instances now")
    for col in ("journey", "entered", "held out", "waiting", "done", "exited", "bought"):
        j.add_column(col, justify="left" if col == "journey" else "right")
    for f in demo.funnels:
        if not f.by_status:
            continue
        j.add_row(f.journey, f"{f.entered:,}", f"{f.held_out:,}", f"{f.by_status.get('active', 0):,}",
                  f"{f.by_status.get('completed', 0):,}", f"{f.by_status.get('exited', 0):,}",
                  f"{f.converted.get('messaged', 0):,}")
    console.print(j)
    console.print("  each step is taken once per instance; `membercare journeys show NAME` prints a journey's "
                  "funnel, and the report has each journey's funnel and holdout lift.")


__all__ = ["JourneyStop", "JourneysDemo", "print_journeys_summary", "run_journeys"]
