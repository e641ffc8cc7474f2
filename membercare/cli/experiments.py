"""``membercare hillstrom``: load the Hillstrom e-mail experiment as shop rows and report on it.

``membercare hillstrom load`` inserts the 64,000 customers as members, the two e-mail arms as campaign
messages with the No E-Mail customers as their holdout, visits as click events and purchases as orders
(:mod:`membercare.optimise.hillstrom`, ``docs/hillstrom.md``). ``membercare hillstrom report`` then runs the
ordinary campaign report over the send day with the experiment's two-week window: the men's e-mail lifts
visits by +7.66 points [7.00, 8.32].
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, migrated_engine
from membercare.errors import InputError

hillstrom_app = typer.Typer(help="The Hillstrom e-mail experiment as real shop rows: load it, report its lift.",
                            no_args_is_help=True)
app.add_typer(hillstrom_app, name="hillstrom")

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hillstrom" / "hillstrom.csv.zip"


def _engine(db: str | None):
    if db is None:
        return migrated_engine()
    from membercare.db import make_engine, pending_revisions, upgrade

    engine = make_engine(db)
    if pending_revisions(engine):
        upgrade(db)
    return engine


def _sent_at(text: str | None):
    from membercare.optimise.hillstrom import DEFAULT_SENT_AT
    from membercare.timeutil import parse_as_of

    if text is None:
        return DEFAULT_SENT_AT
    try:
        return parse_as_of(text, "UTC")
    except ValueError as exc:
        raise InputError(f"--sent-at: {exc}") from None


@hillstrom_app.command("load")
def load(
    file: Path = typer.Option(FIXTURE, "--file", help="hillstrom.csv or the .zip holding it "
                              "(default: the copy in tests/fixtures/hillstrom)."),
    db: str | None = typer.Option(None, "--db", help="Database URL (default: MEMBERCARE_DATABASE_URL or the "
                                  "embedded SQLite)."),
    sent_at: str | None = typer.Option(None, "--sent-at", help="When the campaign went out (ISO, UTC if naive; "
                                       "default 2008-03-03T14:00Z). The data set has no dates."),
    batch_size: int = typer.Option(5_000, "--batch-size", min=1, help="Customers per transaction."),
    show_rejects: int = typer.Option(20, "--show-rejects", min=0, help="Rejected lines to list."),
) -> None:
    """Load the 64,000 customers as members, messages, holdout rows, visits and orders (idempotent)."""
    from membercare.optimise.hillstrom import load_hillstrom_rows

    if not file.exists():
        raise InputError(f"--file {file}: no such file")
    summary = load_hillstrom_rows(_engine(db), file, sent_at=_sent_at(sent_at), batch_size=batch_size)
    t = Table(title=f"Hillstrom load: {summary.loaded:,} of {summary.rows:,} rows valid")
    t.add_column("table")
    t.add_column("rows added", justify="right")
    for table, n in summary.inserted.items():
        t.add_row(table, f"{n:,}")
    console.print(t)
    console.print("arms: " + ", ".join(f"{arm} {n:,}" for arm, n in sorted(summary.arms.items())))
    if not any(summary.inserted.values()) and summary.loaded:
        console.print("already loaded: nothing added")
    if summary.rejected:
        console.print(f"[bold red]{len(summary.rejected):,} row(s) rejected[/]")
        for line, reason in summary.rejected[:show_rejects]:
            console.print(f"  line {line}: {reason}")
        raise typer.Exit(1)


@hillstrom_app.command("report")
def report(
    db: str | None = typer.Option(None, "--db", help="Database URL (default: MEMBERCARE_DATABASE_URL or the "
                                  "embedded SQLite)."),
    sent_at: str | None = typer.Option(None, "--sent-at", help="The --sent-at the data was loaded with."),
    html: Path | None = typer.Option(None, "--html", help="Also write the HTML report."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """The ordinary campaign report over the send day, with the experiment's 14-day window, in USD."""
    from membercare.engagement.attribution import AttributionSettings
    from membercare.optimise.hillstrom import CURRENCY, WINDOW, report_range
    from membercare.reports import ReportOptions, build_report

    since, until = report_range(_sent_at(sent_at))
    options = ReportOptions(
        since=since, until=until, timezone="UTC", currency=CURRENCY,
        attribution=AttributionSettings(window=WINDOW),
        segments={"hillstrom_mens": "Mens E-Mail arm", "hillstrom_womens": "Womens E-Mail arm"},
    )
    rep = build_report(_engine(db), options)
    if html is not None:
        from membercare.reports.html import write_html

        write_html(rep, html)
    if as_json:
        print(json.dumps(rep.to_dict(), ensure_ascii=False, indent=2))
        return
    from membercare.reports.text import print_experiments

    console.print(f"[bold]Hillstrom experiment[/] {since:%Y-%m-%d} · window {WINDOW / timedelta(days=1):g} days · "
                  f"same figures as: membercare report --since {since:%Y-%m-%dT%H:%MZ} --until {until:%Y-%m-%dT%H:%MZ} "
                  f"--window-days {WINDOW / timedelta(days=1):g}")
    print_experiments(console, rep)
    if html is not None:
        console.print(f"HTML report written to {html}")
