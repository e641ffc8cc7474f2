"""``membercare segments|rfm|churn|tiers ...``: inspect segments and compute member scores."""

from __future__ import annotations

import json
import time
from datetime import date, datetime
from pathlib import Path

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, err_console, migrated_engine, state
from membercare.errors import InputError

segments_app = typer.Typer(help="List, count and inspect member segments.", no_args_is_help=True)
rfm_app = typer.Typer(help="RFM (recency, frequency, monetary) scoring.", no_args_is_help=True)
churn_app = typer.Typer(help="BG/NBD churn model: fit on transactions, score the shop's members.", no_args_is_help=True)
tiers_app = typer.Typer(help="Membership tier reviews: upgrades, renewals, downgrades.", no_args_is_help=True)
app.add_typer(segments_app, name="segments")
app.add_typer(rfm_app, name="rfm")
app.add_typer(churn_app, name="churn")
app.add_typer(tiers_app, name="tiers")

AS_OF_HELP = "Evaluate as of this date (start of day in the shop's time zone) or ISO datetime; default now."
PARAM_HELP = "Segment parameter SEGMENT.NAME=VALUE, e.g. new_members.days=7 (repeatable)."


def _as_of(text: str | None) -> datetime:
    try:
        from membercare.timeutil import parse_as_of

        return parse_as_of(text, state.settings.shop_timezone)
    except ValueError as exc:
        raise InputError(f"--as-of: {exc}") from None


def _shop(when: datetime) -> str:
    """A date as the shop reads it (segments count days in the shop's zone, not UTC)."""
    from membercare.timeutil import shop_date_label

    return shop_date_label(when, state.settings.shop_timezone)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _notes(ctx) -> None:
    for note in dict.fromkeys(ctx.notes):
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)


def _parse_all(exprs: list[str], param_opts: list[str]):
    from segments import base

    params = base.parse_param_options(param_opts)
    for name in params:
        base.get(name)  # unknown segment names fail with the list of valid ones
    out = [(expr, base.parse(expr, {k: v for k, v in params.items() if k in base.names_in(expr)})) for expr in exprs]
    used = set().union(*(base.names_in(e) for e in exprs))
    for name in params:
        if name not in used:
            raise InputError(f"--param given for segment {name!r}, which is not being evaluated")
    return out


@segments_app.command("list")
def list_segments() -> None:
    """List the segments with their descriptions and parameters."""
    from segments import definitions

    t = Table(show_lines=True)
    for col in ("segment", "description", "parameters"):
        t.add_column(col, overflow="fold")
    for d in definitions():
        t.add_row(f"[bold]{d.name}[/]", d.description, "\n".join(p.describe() for p in d.params) or "-")
    console.print(t)


@segments_app.command("count")
def count_segments(
    names: list[str] = typer.Argument(None, help="Segment names or expressions ('vip and not churn_risk'); "
                                      "default: every standard segment."),
    as_of: str = typer.Option(None, "--as-of", help=AS_OF_HELP),
    param: list[str] = typer.Option([], "--param", "-p", help=PARAM_HELP),
) -> None:
    """Count the members of segments (each evaluated in the database)."""
    from segments import SegmentContext, count, definitions
    from segments.base import parse_param_options

    when = _as_of(as_of)
    if names:
        todo = _parse_all(names, param)
        skipped: list[tuple[str, str]] = []
    else:
        params = parse_param_options(param)
        todo, skipped = [], []
        from segments import base

        for name in params:
            base.get(name)
        for d in definitions():
            missing = [p.name for p in d.params if p.required and p.name not in params.get(d.name, {})]
            if missing:
                skipped.append((d.name, f"needs --param {d.name}.{missing[0]}=..."))
            else:
                todo.append((d.name, base.ref(d.name, **params.get(d.name, {}))))
    t = Table(title=f"Segment counts as of {_shop(when)}")
    t.add_column("segment")
    t.add_column("members", justify="right")
    t.add_column("seconds", justify="right")
    with migrated_engine().connect() as conn:
        ctx = SegmentContext(conn, when, state.settings.shop_timezone)
        for label, seg in todo:
            start = time.perf_counter()
            n = count(ctx, seg)
            t.add_row(label, f"{n:,}", f"{time.perf_counter() - start:.2f}")
    for label, why in skipped:
        t.add_row(label, f"[dim]{why}[/]", "")
    console.print(t)
    _notes(ctx)


@segments_app.command("show")
def show_segment(
    name: str = typer.Argument(..., help="Segment name or expression."),
    as_of: str = typer.Option(None, "--as-of", help=AS_OF_HELP),
    limit: int = typer.Option(20, "--limit", min=1, help="How many members to show."),
    param: list[str] = typer.Option([], "--param", "-p", help=PARAM_HELP),
) -> None:
    """Show members of a segment with the fields that put them there (contacts redacted)."""
    from membercare.delivery.contract import redact
    from segments import SegmentContext, count, rows

    when = _as_of(as_of)
    ((_, seg),) = _parse_all([name], param)
    with migrated_engine().connect() as conn:
        ctx = SegmentContext(conn, when, state.settings.shop_timezone)
        total = count(ctx, seg)
        members = rows(ctx, seg, limit=limit)
    t = Table(title=f"{name}: {total:,} members as of {_shop(when)} (showing {len(members)})")
    why = [k for k in (members[0].keys() if members else []) if k not in
           ("external_id", "name", "email", "phone", "timezone", "member_id")]
    for col in ("member", "name", "email", "phone", "timezone", *why):
        t.add_column(col, overflow="fold")
    for r in members:
        t.add_row(r["external_id"], r["name"], redact(r["email"]), redact(r["phone"]), r["timezone"],
                  *[_fmt(r[k]) for k in why])
    console.print(t)
    _notes(ctx)


@segments_app.command("sql")
def segment_sql(
    name: str = typer.Argument(..., help="Segment name or expression."),
    as_of: str = typer.Option(None, "--as-of", help=AS_OF_HELP),
    param: list[str] = typer.Option([], "--param", "-p", help=PARAM_HELP),
) -> None:
    """Print the SQL a segment runs (constants inlined), for review or EXPLAIN."""
    from segments import SegmentContext, compiled_sql

    when = _as_of(as_of)
    ((_, seg),) = _parse_all([name], param)
    with migrated_engine().connect() as conn:
        console.print(compiled_sql(SegmentContext(conn, when, state.settings.shop_timezone), seg), markup=False)


@rfm_app.command("score")
def rfm_score(
    as_of: str = typer.Option(None, "--as-of", help=AS_OF_HELP),
    window_days: int = typer.Option(None, "--window-days", min=1,
                                    help="Only purchases in this many days (default: all)."),
) -> None:
    """Compute and store RFM scores and cells for every buyer."""
    from segments.rfm import score_rfm

    when = _as_of(as_of)
    start = time.perf_counter()
    with migrated_engine().begin() as conn:
        run = score_rfm(conn, when, shop_timezone=state.settings.shop_timezone, window_days=window_days)
    t = Table(title=f"RFM scores for {run.as_of_date}: {run.scored:,} buyers in {time.perf_counter() - start:.1f} s")
    t.add_column("cell")
    t.add_column("members", justify="right")
    for cell, n in sorted(run.cells.items(), key=lambda kv: -kv[1]):
        t.add_row(cell, f"{n:,}")
    console.print(t)


@churn_app.command("fit")
def churn_fit(
    transactions: Path = typer.Option(..., "--transactions", help="Transactions file."),
    fmt: str = typer.Option("orders-csv", "--format", help="cdnow or orders-csv."),
    calibration_end: str = typer.Option(..., "--calibration-end",
                                        help="Last day of the calibration period (YYYY-MM-DD)."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimates as JSON."),
) -> None:
    """Fit BG/NBD by maximum likelihood on a transactions file and print r, alpha, a, b."""
    from segments.churn import fit_file

    try:
        end = date.fromisoformat(calibration_end)
    except ValueError:
        raise InputError(f"--calibration-end must be a date YYYY-MM-DD, got {calibration_end!r}") from None
    p = fit_file(transactions, fmt, end)
    out = {"r": p.r, "alpha": p.alpha, "a": p.a, "b": p.b, "log_likelihood": p.log_likelihood, "customers": p.customers}
    if as_json:
        print(json.dumps(out))
        return
    t = Table(title=f"BG/NBD on {transactions.name} (calibration to {end}, weeks)")
    t.add_column("parameter")
    t.add_column("estimate", justify="right")
    for k, v in out.items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
    console.print(t)


@churn_app.command("score")
def churn_score(
    as_of: str = typer.Option(None, "--as-of", help=AS_OF_HELP),
    horizon_days: int = typer.Option(30, "--horizon-days", min=1, max=3650, help="Period of expected purchases."),
) -> None:
    """Fit BG/NBD on the shop's orders and store P(alive) and expected purchases per buyer."""
    from segments.churn_scoring import score_churn

    when = _as_of(as_of)
    start = time.perf_counter()
    with migrated_engine().begin() as conn:
        run = score_churn(conn, when, shop_timezone=state.settings.shop_timezone, horizon_days=horizon_days)
    p = run.params
    console.print(
        f"churn scores for {run.as_of_date}: {run.scored:,} buyers ({run.distinct_rows:,} distinct histories) in "
        f"{time.perf_counter() - start:.1f} s; r={p.r:.4f} alpha={p.alpha:.4f} a={p.a:.4f} b={p.b:.4f} "
        f"LL={p.log_likelihood:,.1f}{'' if p.converged else ' (optimiser did not report convergence)'}; "
        f"{run.at_risk:,} repeat buyers with P(alive) < 0.5"
    )


@tiers_app.command("review")
def tiers_review(
    as_of: str = typer.Option(None, "--as-of", help=AS_OF_HELP),
    apply_changes: bool = typer.Option(False, "--apply", help="Write the changes (tier history and members.tier)."),
    limit: int = typer.Option(10, "--limit", min=0, help="How many individual changes to list."),
) -> None:
    """Evaluate tier upgrades, renewals and downgrades as of a date (dry run unless --apply)."""
    from collections import Counter

    from membercare import tiers

    when = _as_of(as_of)
    with migrated_engine().begin() as conn:
        changes = list(tiers.review(conn, when))
        if apply_changes:
            tiers.apply(conn, changes, when)
    summary = Counter((c.from_tier, c.to_tier, c.reason) for c in changes)
    t = Table(title=f"Tier review as of {_shop(when)}: {len(changes):,} changes"
              + (" (applied)" if apply_changes else " (dry run; --apply to write)"))
    for col in ("from", "to", "reason", "members"):
        t.add_column(col, justify="right" if col == "members" else "left")
    for (a, b, reason), n in sorted(summary.items()):
        t.add_row(a, b, reason, f"{n:,}")
    console.print(t)
    if limit and changes:
        d = Table(title=f"First {min(limit, len(changes))} changes")
        for col in ("member", "from", "to", "reason", "window orders", "window spend"):
            d.add_column(col)
        for c in changes[:limit]:
            d.add_row(c.external_id, c.from_tier, c.to_tier, c.reason, str(c.window_orders),
                      f"{c.window_spend_minor / 100:,.2f}")
        console.print(d)
