"""``membercare trigger EVENT --member ID``: event-triggered messages for one member (``trigger-message`` flow)."""

from __future__ import annotations

import typer

from membercare.cli import app
from membercare.cli.common import console, migrated_engine, state


@app.command("trigger")
def trigger_cmd(
    event: str = typer.Argument(..., help="Event name, e.g. order.delivered, order.shipped, review.negative."),
    member: str = typer.Option(..., "--member", help="Member external id (or database id)."),
    order: str = typer.Option(None, "--order", help="Order external id (order events)."),
    ref: str = typer.Option(None, "--ref", help="Event reference (e.g. the review id): one message per reference."),
    at: str = typer.Option(None, "--at", help="When the event happened (ISO datetime; default now)."),
) -> None:
    """Start the campaigns an event triggers, for one member, through the Prefect flow."""
    from membercare.campaigns.triggers import plan_trigger
    from membercare.timeutil import parse_as_of

    # Validate before Prefect starts: unknown events, members and orders are one-line errors.
    plans = plan_trigger(migrated_engine(), state.settings, event, member, order=order, ref=ref,
                         at=parse_as_of(at, state.settings.shop_timezone) if at else None)
    for tr in plans:
        if tr.expired:
            console.print(f"{tr.campaign}: skipped, {tr.expired}")
    if all(tr.expired for tr in plans):
        return  # nothing to send: Prefect is not started
    from flows.triggers import trigger_message

    for r in trigger_message(event=event, member=member, order=order, ref=ref, at=at):
        if r["status"] == "skipped":
            continue  # printed above
        if r["status"] == "due later":
            console.print(f"{r['campaign']}: due {r['due_at']}; the daily {r['campaign']} run sends it then")
        else:
            console.print(f"{r['campaign']}: run {r['status']}, sent {r['sent']}"
                          + ("" if r["newly_planned"] else " (already handled: nothing sent twice)"))
