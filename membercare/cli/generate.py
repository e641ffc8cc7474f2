"""``membercare generate-shop``: fill the database with a realistic, reproducible demo shop."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, migrated_engine, state
from membercare.errors import InputError


@app.command("generate-shop")
def generate_shop_command(
    members: int = typer.Option(10_000, "--members", "-n", help="How many members to generate."),
    seed: int = typer.Option(42, "--seed", help="Random seed: the same seed, date and size give identical data."),
    as_of: str | None = typer.Option(
        None, "--as-of",
        help="The shop's 'now' (a date = its start in the shop timezone, or an ISO datetime). Default: today.",
    ),
    replace: bool = typer.Option(False, "--replace", help="Delete the existing shop data first."),
    batch_size: int = typer.Option(5000, "--batch-size",
                                   help="Members per database transaction (does not change the data)."),
) -> None:
    """Generate a demo shop: members, consents, devices, catalogue, orders, coupons, tiers and points."""
    from membercare.data.generator import default_as_of, generate_shop
    from membercare.timeutil import parse_as_of, shop_date_label

    tz = state.settings.shop_timezone
    try:
        when = parse_as_of(as_of, tz) if as_of else default_as_of(tz)
    except ValueError as exc:
        raise InputError(f"--as-of: {exc}") from exc
    engine = migrated_engine()
    with Progress(
        TextColumn("[bold]generating[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("members"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task("members", total=members)
        summary = generate_shop(
            engine, members=members, seed=seed, as_of=when, batch_size=batch_size, replace=replace,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(f"[bold]Demo shop[/] seed {seed}, as of {shop_date_label(when, tz)}")
    table = Table()
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in summary.counts.items():
        table.add_row(name, f"{rows:,}")
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{sum(summary.counts.values()):,}[/]")
    console.print(table)
    console.print(f"done in {summary.seconds:.1f} s")
