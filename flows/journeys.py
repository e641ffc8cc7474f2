"""``advance-journeys`` (every few minutes): enter segment journeys' members, advance every due journey
instance in batches, then send what the steps planned.

Thin: the core does the work (:mod:`membercare.journeys.advance`, exactly once per step by the database, not
by the orchestrator); one task advances up to ``batches_per_task`` batches, so a million waiting members cost
a handful of tasks, and a retried task repeats nothing (a batch either committed or left no trace). The outbox
runs that got rows are dispatched as ``dispatch-due`` does, with the same shared rate limits. The counts are
published as a table artifact (``advance-journeys``) for the Prefect UI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import Connection

from flows.common import engine_for, resolved_env, retry_transient, run_logger, settings_from
from membercare.config import Settings
from membercare.journeys.advance import Advancer, AdvanceReport
from membercare.journeys.definition import Journey


@task(name="enter-segments", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def enter_segments(settings: Settings, now: datetime) -> int:
    from membercare.db import in_transaction
    from membercare.journeys.definition import list_journeys
    from membercare.journeys.entry import enter_from_segment

    engine, entered = engine_for(settings), 0
    for journey in list_journeys(settings):
        if journey.entry.segment is not None:
            def work(conn: Connection, j: Journey = journey) -> int:
                return enter_from_segment(conn, j, now, settings.shop_timezone)

            entered += in_transaction(engine, work)
    return entered


@task(name="advance", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def advance(settings: Settings, batch_size: int, batches: int, wake: bool, now: datetime) -> AdvanceReport:
    return Advancer(engine_for(settings), settings, clock=lambda: now, batch_size=batch_size).advance(
        max_batches=batches, wake=wake)


@flow(name="advance-journeys", log_prints=False)
def advance_journeys(batch_size: int = 500, batches_per_task: int = 20, max_tasks: int = 200,
                     send: bool = True, as_of: datetime | None = None) -> dict[str, Any]:
    """Advance every due journey instance (``max_tasks`` x ``batches_per_task`` x ``batch_size`` at most per
    run; the next run continues), then dispatch the rows the send steps planned, and any journey rows still due
    from earlier runs (``send``).

    ``as_of``: the instant to advance at (default now). The demo replays a month of journeys with it on a
    simulated clock; a schedule leaves it unset."""
    from membercare.timeutil import ensure_utc, utcnow

    logger = run_logger()
    env = resolved_env()
    settings = settings_from(env)
    now = ensure_utc(as_of) if as_of is not None else utcnow()
    entered = enter_segments(settings, now)
    total = AdvanceReport()
    for i in range(max_tasks):
        rep = advance(settings, batch_size, batches_per_task, i == 0, now)
        total.add(rep)
        if rep.batches < batches_per_task or not rep.claimed:
            break  # the last task found nothing more due
    out = {"entered from segments": entered, **total.as_dict()}
    sent = 0
    runs = set(total.run_ids)
    if send:
        from membercare.journeys.send import due_journey_runs

        # Also the rows an earlier advance planned but did not dispatch (it crashed, or ran with send=False).
        with engine_for(settings).connect() as conn:
            runs |= due_journey_runs(conn, utcnow())
    if send and runs:
        from channels.registry import build_channels, close_channels
        from flows.campaign import dispatch_until_settled, limiters_for

        adapters = build_channels(env)
        try:
            limiters = limiters_for(list(adapters), logger)
            for run_id in sorted(runs):
                res = dispatch_until_settled(settings, run_id, adapters, limiters, dispatchers=1,
                                             wait_for_deferred_s=0.0)
                sent += res.outcomes.get("sent", 0)
        finally:
            close_channels(adapters)
    out["sent"] = sent
    logger.info("advance-journeys: %s", out)
    rows = [{"metric": "entered from segments", "value": entered}, {"metric": "instances advanced",
                                                                     "value": total.claimed},
            {"metric": "completed", "value": total.completed}, {"metric": "sent", "value": sent}]
    rows += [{"metric": f"step {k}", "value": v} for k, v in sorted(total.steps.items())]
    rows += [{"metric": f"send {k}", "value": v} for k, v in sorted(total.sends.items())]
    rows += [{"metric": f"exited: {k}", "value": v} for k, v in sorted(total.exited.items())]
    create_table_artifact(rows, key="advance-journeys",
                          description=f"journey instances advanced at {now:%Y-%m-%d %H:%M} UTC")
    return out
