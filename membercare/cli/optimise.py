"""``membercare optimise evaluate``: off-policy estimates of send-hour and channel rules from the shop's decision log.

    membercare optimise evaluate --days 90 --hour-rule best-time
    membercare optimise evaluate --hour-rule fixed --hour 19 --channel-rule preference --json

Reads the outbox decisions (policy and propensities, migration ``0015_propensity``) and the click-level
engagement of the messages (:mod:`membercare.optimise.offpolicy_logs`); docs/optimisation.md section 9.
"""

from __future__ import annotations

import json
from datetime import timedelta

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, migrated_engine
from membercare.errors import InputError

optimise_app = typer.Typer(help="Causal send-time and channel learning: evaluate rules off-policy from the logs.",
                           no_args_is_help=True)
app.add_typer(optimise_app, name="optimise")

CANDIDATES = ("logged", "usual", "best-time")


@optimise_app.command("evaluate")
def evaluate(
    days: int = typer.Option(90, "--days", min=1, help="Window: messages sent in the last N days before --as-of."),
    as_of: str | None = typer.Option(None, "--as-of", help="End of the window (ISO, UTC if naive; default now)."),
    campaign: str | None = typer.Option(None, "--campaign", help="Only this campaign's messages."),
    hour_rule: list[str] = typer.Option(list(CANDIDATES), "--hour-rule",
                                        help="logged | fixed | usual | best-time (repeatable)."),
    hour: int = typer.Option(19, "--hour", min=0, max=23, help="The local hour of --hour-rule fixed."),
    channel_rule: str = typer.Option("logged", "--channel-rule", help="logged | preference."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Estimate the engagement rate per message each candidate rule would have had (IPS, SNIPS, doubly robust)."""
    from membercare.optimise.offpolicy_logs import evaluate_candidate, load_decision_log
    from membercare.timeutil import parse_as_of, utcnow

    try:
        end = parse_as_of(as_of, "UTC") if as_of else utcnow()
    except ValueError as exc:
        raise InputError(f"--as-of: {exc}") from None
    if channel_rule not in ("logged", "preference"):
        raise InputError("--channel-rule must be logged or preference")
    for r in hour_rule:
        if r not in ("logged", "fixed", "usual", "best-time"):
            raise InputError(f"--hour-rule {r!r}: use logged, fixed, usual or best-time")
    with migrated_engine().connect() as conn:
        log = load_decision_log(conn, end - timedelta(days=days), end, campaign=campaign)
    if log.n == 0:
        raise InputError(f"no sent marketing message with a logged decision in the {days} days before {end:%Y-%m-%d}"
                         f" ({log.skipped} without one); plan with optimise.explore > 0 to collect them")
    out: dict[str, dict] = {}
    for r in hour_rule:
        label = f"{channel_rule} channel, {r} hour" + (f" {hour}:00" if r == "fixed" else "")
        est = evaluate_candidate(log, channel_rule=channel_rule, hour_rule=r, hour=hour)  # type: ignore[arg-type]
        out[label] = {k: e.to_dict() for k, e in est.items()}
    if as_json:
        console.print_json(json.dumps({"rows": log.n, "rows_without_decision": log.skipped, "candidates": out}))
        return
    table = Table(title=f"Off-policy estimates: {log.n:,} logged messages ({log.skipped:,} without a decision), "
                        "engagement per message, 95 % CI clustered by member")
    for col in ("candidate", "IPS", "SNIPS", "DR", "matched", "effective n"):
        table.add_column(col)
    for label, row in out.items():
        cells = [f"{100 * row[k]['value']:.2f} % [{100 * row[k]['ci'][0]:.2f}, {100 * row[k]['ci'][1]:.2f}]"
                 for k in ("ips", "snips", "dr")]
        table.add_row(label, *cells, f"{row['ips']['matched']:,}", f"{row['ips']['effective_n']:,.0f}")
    console.print(table)
