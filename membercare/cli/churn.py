"""``membercare churn validate``: check the BG/NBD churn model on a calibration/holdout split of a transactions file.

The ``churn`` command group lives in :mod:`membercare.cli.segments` (fit, score); this module adds ``validate``.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import typer
from rich.table import Table

from membercare.cli.common import console
from membercare.cli.segments import churn_app
from membercare.errors import InputError

TRACK_EVERY = 13  # weeks between rows of the printed tracking table (the JSON has every week)


def _date(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{option} must be a date YYYY-MM-DD, got {text!r}") from None


@churn_app.command("validate")
def churn_validate(
    transactions: Path = typer.Option(..., "--transactions", help="Transactions file."),
    fmt: str = typer.Option("orders-csv", "--format", help="cdnow or orders-csv."),
    calibration_end: str = typer.Option(..., "--calibration-end",
                                        help="Last day of the calibration period (YYYY-MM-DD)."),
    holdout_end: str = typer.Option(..., "--holdout-end", help="Last day of the holdout period (YYYY-MM-DD)."),
    p_silent: float = typer.Option(0.5, "--p-silent", min=0.0, max=1.0,
                                   help="Flag customers whose P(no purchase in the holdout) is at least this."),
    as_json: bool = typer.Option(False, "--json", help="Print everything (every week) as JSON."),
) -> None:
    """Fit BG/NBD on the calibration period and compare with the holdout: cumulative repeat transactions per week,
    conditional expectations by purchase count, and how well the churn flags are calibrated."""
    from segments.churn_validate import validate_file

    v = validate_file(transactions, fmt, _date(calibration_end, "--calibration-end"),
                      _date(holdout_end, "--holdout-end"), p_silent=p_silent)
    if as_json:
        print(json.dumps({**v.to_dict(), "final_error": v.final_error}))
        return
    p = v.params
    console.print(f"BG/NBD on {v.customers:,} customers (calibration to {v.calibration_end}): r={p.r:.4f} "
                  f"alpha={p.alpha:.4f} a={p.a:.4f} b={p.b:.4f} LL={p.log_likelihood:,.1f}")
    t = Table(title="Cumulative repeat transactions")
    for col in ("week", "actual", "predicted", "error"):
        t.add_column(col, justify="right")
    for i, w in enumerate(v.weeks):
        if w % TRACK_EVERY == 0 or w == v.weeks[-1]:
            a, e = v.actual_cumulative[i], v.predicted_cumulative[i]
            t.add_row(str(w), f"{a:,.0f}", f"{e:,.1f}", f"{e / a - 1:+.1%}" if a else "-")
    console.print(t)
    cond = Table(title=f"Holdout purchases per customer by calibration repeat purchases (to {v.holdout_end})")
    for col in ("x", "customers", "actual", "predicted"):
        cond.add_column(col, justify="right")
    for row in v.conditional:
        cond.add_row(row["x"], f"{row['customers']:,}", f"{row['actual']:.3f}", f"{row['predicted']:.3f}")
    console.print(cond)
    flags = Table(title="Churn flags: share of the flagged who bought in the holdout")
    for col in ("rule", "flagged", "bought", "model implies"):
        flags.add_column(col, justify="right" if col != "rule" else "left")
    for flag in v.flags:
        flags.add_row(flag.rule, f"{flag.flagged:,}", f"{flag.bought_in_holdout:.1%}", f"{flag.implied:.1%}")
    console.print(flags)
