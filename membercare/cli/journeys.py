"""``membercare journeys list|show|simulate|advance`` and ``membercare events import FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from membercare.cli import app
from membercare.cli.common import console, migrated_engine, state

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

journeys_app = typer.Typer(help="Multi-step journeys: list, show, simulate a member's path, advance due instances.",
                           no_args_is_help=True)
events_app = typer.Typer(help="Member events (cart updates, orders, reviews, custom) that feed the journeys.",
                         no_args_is_help=True)
app.add_typer(journeys_app, name="journeys")
app.add_typer(events_app, name="events")


def _funnel(name: str):
    from membercare.journeys.funnel import funnel
    from membercare.timeutil import utcnow

    with migrated_engine().connect() as conn:
        return funnel(conn, name, utcnow())


@journeys_app.command("list")
def list_cmd() -> None:
    """Every journey of the templates folder with its entry and its instances by status."""
    from membercare.journeys.definition import list_journeys

    for j in list_journeys(state.settings):
        status = _funnel(j.name).by_status
        seg = j.entry.segment.name if j.entry.segment else ""
        entry = f"event {j.entry.event}" if j.entry.event else f"segment {seg}"
        counts = ", ".join(f"{st} {n}" for st, n in sorted(status.items())) or "no instances"
        console.print(f"{j.name}: {len(j.steps)} steps, enters on {entry}, re-entry {j.reentry}, "
                      f"holdout {j.holdout:.0%} ({counts})")
        console.print(f"  {j.description}")


@journeys_app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Journey name.")) -> None:
    """The journey's steps, and how many instances took each step (by outcome) and left (by reason)."""
    from rich.markup import escape

    from membercare.journeys.definition import load_journey

    j = load_journey(name, state.settings)
    f = _funnel(name)
    console.print(f"{j.name}: {j.description}")
    console.print(f"entry: {j.entry.model_dump(exclude_none=True)}; re-entry {j.reentry}; holdout {j.holdout:.0%}; "
                  f"exit: {j.exit.model_dump(exclude_defaults=True) or 'none'}")
    for s in j.steps:
        detail = getattr(s, s.kind).model_dump(exclude_none=True, exclude_defaults=True, by_alias=True)
        taken = ", ".join(f"{o} {n}" for o, n in sorted(f.steps.get(s.id, {}).items())) or "-"
        if s.id in f.sent:
            taken += f"; sent {f.sent[s.id]}"
        # escape: "[planned 2]" would otherwise be read as Rich markup and vanish
        console.print(escape(f"  {s.id:<16} {s.kind:<9} {detail}{' -> ' + s.next if s.next else ''}   [{taken}]"))
    console.print("instances: " + (", ".join(f"{st} {n}" for st, n in sorted(f.by_status.items())) or "none"))
    if f.exited:
        console.print("exited: " + ", ".join(f"{r} {n}" for r, n in sorted(f.exited.items())))
    for group in ("messaged", "holdout"):
        rate = f.rate(group)
        if rate is not None:
            console.print(f"converted ({group}): {f.converted.get(group, 0)} of "
                          f"{f.held_out if group == 'holdout' else f.entered} ({rate:.1%})")
    if f.lift is not None:
        console.print(f"difference messaged - holdout: {f.lift:+.1%} (counts only; no significance claimed)")


@journeys_app.command("simulate")
def simulate_cmd(
    name: str = typer.Argument(..., help="Journey name."),
    member: list[str] = typer.Option(..., "--member", "-m", help="Member external id or database id (repeatable)."),
    at: str = typer.Option(None, "--at", help="Entry instant (ISO datetime or date; default now)."),
) -> None:
    """Print the path each member would take, with the reason at each step; nothing is sent or stored."""
    from membercare.journeys.definition import load_journey
    from membercare.journeys.simulate import simulate
    from membercare.timeutil import parse_as_of

    j = load_journey(name, state.settings)
    now = parse_as_of(at, state.settings.shop_timezone)
    for m in member:
        console.print(f"[bold]{name}[/] for member {m}:")
        for line in simulate(migrated_engine(), state.settings, j, m, now):
            console.print(f"  {line}")


@journeys_app.command("advance")
def advance_cmd(
    batch_size: int = typer.Option(500, "--batch-size", min=1, max=10_000, help="Instances per transaction."),
) -> None:
    """Advance every due instance now (what the advance-journeys flow does, without dispatching)."""
    from membercare.journeys.advance import Advancer

    rep = Advancer(migrated_engine(), state.settings, batch_size=batch_size).advance()
    console.print(f"advanced {rep.claimed} instance(s) in {rep.batches} batch(es): steps {dict(rep.steps)}, "
                  f"sends {dict(rep.sends)}, exited {dict(rep.exited)}, completed {rep.completed}")


@events_app.command("import")
def import_cmd(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON lines or a JSON document.")
               ) -> None:
    """Store the events of a file once (by event id), starting journeys and ending waits as the API does."""
    from membercare.db import in_transaction
    from membercare.journeys.definition import list_journeys
    from membercare.journeys.events import EventIn, IngestReport, ingest, read_file
    from membercare.timeutil import utcnow

    engine, now = migrated_engine(), utcnow()
    journeys = list_journeys(state.settings)
    total = IngestReport()
    for chunk in read_file(path, now):
        def work(conn: Connection, chunk: list[EventIn] = chunk) -> IngestReport:
            return ingest(conn, chunk, journeys, now)

        total.add(in_transaction(engine, work))
    console.print(f"{total.received} event(s): {total.stored} stored, {total.duplicates} already stored, "
                  f"{total.unknown_members} for unknown members; {total.entered} journey entries, "
                  f"{total.woken} waiting instance(s) woken")
