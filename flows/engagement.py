"""``sync-engagement`` (every 15 minutes) and ``dispatch-due`` (deferred messages whose time has come).

``sync-engagement`` settles what the ledger does not know yet from what came back: rows of dead
dispatchers become ``unknown``; unknown, in-flight and retry-pending rows that a provider event names are
``sent`` (the event proves acceptance, and cancels a retry that would duplicate); the rest is looked up in
the providers' own records (Twilio's message list and SendGrid's event stream for the configured channels,
see ``membercare.delivery.provider_records``, plus the sandbox's ``GET /sandbox/messages`` when
``records_url`` is given): found -> ``sent``; confirmed never received -> sent again; otherwise settled by
policy after the grace period; and the runs' state counts are refreshed for the reports.

``dispatch-due`` picks up rows deferred past their own run's flow (quiet hours end at 09:00 local time,
throttling, backoff): every run with due rows gets a dispatcher pass, with the same shared rate limits.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import engine_for, resolved_env, retry_transient, run_logger, settings_from

# Called through its module so that the end-to-end benchmark can time it from the outside (bench/e2e).
from membercare.engagement import sync as engagement_sync
from membercare.engagement.sync import SyncReport


@task(name="sync", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def sync(settings, records_url: str | None, grace_minutes: float, lease_minutes: float) -> SyncReport:
    from membercare.delivery.provider_records import provider_records_from_env
    from membercare.delivery.reconcile import SandboxRecords

    engine = engine_for(settings)
    # Read here, not passed in: task parameters are recorded by Prefect, and the environment holds secrets.
    records = provider_records_from_env(engine, resolved_env(),
                                        also=[SandboxRecords(records_url)] if records_url else [])
    try:
        return engagement_sync.sync_engagement(engine, records=records, grace=timedelta(minutes=grace_minutes),
                                               lease=timedelta(minutes=lease_minutes))
    finally:
        if records is not None:
            records.close()


@task(name="attribute", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def attribute(settings, days: float) -> dict[str, Any]:
    """Recompute conversion attribution for the trailing window (idempotent), when the module is installed."""
    import importlib.util
    from dataclasses import asdict, is_dataclass

    if importlib.util.find_spec("membercare.engagement.attribution") is None:
        return {}
    from membercare.engagement.attribution import compute_attributions
    from membercare.timeutil import utcnow

    until = utcnow()
    result = compute_attributions(engine_for(settings), until - timedelta(days=days), until)
    data = asdict(result) if is_dataclass(result) else {}
    return {f"attribution {k}": v for k, v in data.items() if isinstance(v, (int, float))}


@flow(name="sync-engagement", log_prints=False)
def sync_engagement(records_url: str | None = None, grace_minutes: float = 60.0,
                    lease_minutes: float = 5.0, attribution_days: float = 30.0) -> dict[str, Any]:
    """Settle unknown and in-flight messages from provider events and records; refresh run counts.

    ``records_url``: base URL of a provider-records source speaking the sandbox's ``/sandbox/messages``
    (none for the real providers: their own lookups, built from the channel settings, do the settling).
    """
    settings = settings_from(resolved_env())
    rep = sync(settings, records_url, grace_minutes, lease_minutes)
    out = {k: getattr(rep, k) for k in rep.__dataclass_fields__}
    if attribution_days > 0:
        out.update(attribute(settings, attribution_days))
    run_logger().info("engagement sync: %s", out)
    create_table_artifact([{"metric": k.replace("_", " "), "value": v} for k, v in out.items()],
                          key="sync-engagement", description="engagement sync")
    return out


def due_runs(engine) -> list[int]:
    """Runs with rows that may be claimed now: not paused, or paused by the error budget and due for their
    automatic resumption (the campaign allowed it)."""
    from membercare.delivery.models import CLAIMABLE_STATES, CampaignRun, OutboxMessage, RunStatus
    from membercare.timeutil import utcnow

    o, r = OutboxMessage.__table__, CampaignRun.__table__
    now = utcnow()
    with engine.connect() as conn:
        return list(conn.execute(
            sa.select(o.c.run_id).join(r, r.c.id == o.c.run_id)
            .where(o.c.state.in_(CLAIMABLE_STATES), sa.or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at <= now),
                   r.c.status != RunStatus.CANCELLED.value,
                   sa.or_(r.c.status != RunStatus.PAUSED.value, r.c.auto_resume_at <= now))
            .group_by(o.c.run_id).order_by(o.c.run_id)).scalars())


@flow(name="dispatch-due", log_prints=False)
def dispatch_due(dispatchers: int = 1) -> dict[str, Any]:
    """Send every row that is due, across runs (deferred by quiet hours, throttling or backoff)."""
    from channels.registry import build_channels, close_channels
    from flows.campaign import dispatch_until_settled, limiters_for

    logger = run_logger()
    env = resolved_env()
    settings = settings_from(env)
    engine = engine_for(settings)
    runs = due_runs(engine)
    if not runs:
        logger.info("nothing due")
        return {"runs": 0, "sent": 0}
    adapters = build_channels(env)
    sent = 0
    try:
        limiters = limiters_for(list(adapters), logger)
        for run_id in runs:
            out = dispatch_until_settled(settings, run_id, adapters, limiters, dispatchers=dispatchers,
                                         wait_for_deferred_s=0.0)
            sent += out.outcomes.get("sent", 0)
            if out.stop_reason:
                logger.warning("run %s stopped: %s", run_id, out.stop_reason)
    finally:
        close_channels(adapters)
    logger.info("dispatched due rows of %d run(s): %d sent", len(runs), sent)
    return {"runs": len(runs), "sent": sent}
