"""Operator controls: ``membercare campaign pause|resume|cancel|status RUN`` and ``membercare pause-all|resume-all``.

None of them starts Prefect: they change the run's status (or the global kill switch) in the database, and
the send gate of every dispatcher reads it right before each provider call (see
:mod:`membercare.delivery.controls` and :mod:`membercare.delivery.gate`).
"""

from __future__ import annotations

import getpass

import typer

from membercare.cli import app
from membercare.cli.campaign import campaign_app
from membercare.cli.common import console, migrated_engine

RUN_HELP = "The run: its id, CAMPAIGN/OCCURRENCE, or a campaign name (its newest run)."


def _operator(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers): the record just says "by operator"
        return "operator"


def _describe(info) -> str:
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(info.counts.items())) or "no rows"
    return f"{info.label}: [bold]{info.status}[/]" + (f" ({info.reason})" if info.reason else "") + f"; {counts}"


@campaign_app.command("pause")
def pause_cmd(
    run: str = typer.Argument(..., help=RUN_HELP),
    reason: str = typer.Option(None, "--reason", help="Why (recorded on the run, shown in its report)."),
    by: str = typer.Option(None, "--by", help="Who pauses it (default: your login name)."),
) -> None:
    """Pause a run: its dispatchers stop before their next provider call; nothing is lost."""
    from membercare.delivery.controls import pause_run

    info = pause_run(migrated_engine(), run, reason=reason, by=_operator(by))
    console.print(_describe(info))
    console.print(f"resume with `membercare campaign resume {info.id}`")


@campaign_app.command("resume")
def resume_cmd(
    run: str = typer.Argument(..., help=RUN_HELP),
    send: bool = typer.Option(False, "--send", help="Send what is left now, in this process (otherwise the "
                                                     "scheduled dispatch-due flow or a rerun sends it)."),
    by: str = typer.Option(None, "--by", help="Who resumes it (default: your login name)."),
) -> None:
    """Resume a paused run (never a cancelled one); each waiting message is still sent exactly once."""
    from membercare.delivery.controls import resume_run

    engine = migrated_engine()
    info = resume_run(engine, run, by=_operator(by))
    console.print(_describe(info))
    if send:
        _send_now(engine, info.id)


def _send_now(engine, run_id: int) -> None:
    from channels.registry import build_channels, close_channels
    from membercare.campaigns.dispatch import dispatch_round
    from membercare.cli.common import provider_env
    from membercare.delivery.controls import find_run

    adapters = build_channels(provider_env())
    try:
        out = dispatch_round(engine, run_id, {str(ch): a for ch, a in adapters.items()})
    finally:
        close_channels(adapters)
    console.print(f"sent now: {out.outcomes.get('sent', 0):,} (provider calls {out.attempts:,})"
                  + (f"; stopped: {out.stop_reason}" if out.stop_reason else ""))
    console.print(_describe(find_run(engine, run_id)))


@campaign_app.command("cancel")
def cancel_cmd(
    run: str = typer.Argument(..., help=RUN_HELP),
    reason: str = typer.Option(None, "--reason", help="Why (recorded on the run, shown in its report)."),
    by: str = typer.Option(None, "--by", help="Who cancels it (default: your login name)."),
    settle_wait: float = typer.Option(10.0, "--settle-wait", min=0.0,
                                      help="Seconds to wait for messages in flight before settling the rest."),
) -> None:
    """Cancel a run for good: it stops like a pause, and every message still waiting is skipped (cancelled)."""
    from membercare.delivery.controls import cancel_run

    console.print(_describe(cancel_run(migrated_engine(), run, reason=reason, by=_operator(by),
                                       settle_wait_s=settle_wait)))


@campaign_app.command("status")
def status_cmd(
    run: str = typer.Argument(None, help=RUN_HELP + " Default: the newest runs."),
    limit: int = typer.Option(15, "--limit", min=1, help="How many runs to list."),
) -> None:
    """The global kill switch and the status of a run (or of the newest runs), with their ledger counts."""
    from membercare.delivery.controls import find_run, list_runs
    from membercare.delivery.gate import kill_switch

    engine = migrated_engine()
    paused, why = kill_switch(engine)
    console.print("all sending: " + (f"[bold red]PAUSED[/] ({why or 'kill switch'})" if paused else "allowed"))
    for info in [find_run(engine, run)] if run else list_runs(engine, limit=limit):
        console.print(_describe(info))


@app.command("pause-all")
def pause_all_cmd(
    reason: str = typer.Option(None, "--reason", help="Why (shown by `campaign status` and in stopped runs)."),
    by: str = typer.Option(None, "--by", help="Who pulls the switch (default: your login name)."),
) -> None:
    """The kill switch: no provider call starts anywhere (every run, every dispatcher) until resume-all."""
    from membercare.delivery.gate import pause_all
    from membercare.timeutil import utcnow

    now = utcnow()
    text = f"paused by {_operator(by)} at {now.isoformat(timespec='seconds')}: {reason or 'operator kill switch'}"
    pause_all(migrated_engine(), text, now=now)
    console.print(f"all sending is paused ({text}); undo with `membercare resume-all`")


@app.command("resume-all")
def resume_all_cmd() -> None:
    """Release the kill switch. Runs stopped by it continue on their next dispatcher pass (dispatch-due)."""
    from membercare.delivery.gate import resume_all

    resume_all(migrated_engine())
    console.print("all sending is allowed again")
