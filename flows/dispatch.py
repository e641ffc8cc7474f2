"""``dispatch-run``: one dispatcher on one campaign run, on whichever worker of the pool picks it up; and the fan-out
that starts several of them from a campaign flow (``run-campaign``'s ``fan_out`` parameter).

Why a deployment: the ``dispatchers`` parameter of a campaign runs several dispatcher *processes*, all on the
worker that runs the campaign flow. ``fan_out: N`` instead creates N flow runs of the ``dispatch-run``
deployment (``run_deployment(..., timeout=0)``), which any worker of the pool can take, so adding workers on
more hosts adds throughput. Nothing new guards exactly-once: claims are ``FOR UPDATE SKIP LOCKED`` and every
outcome is recorded under the claim, as for processes on one host; the provider rates are the Prefect global
concurrency limits every dispatcher takes its slots from (``flows/ratelimits.py``).

A worker can die with its flow runs (a host lost). Its ``dispatch-run`` stays "Running" in the API, its claimed
rows stay ``sending``. So the campaign flow does not wait for the runs' states alone: it watches the run's
unsettled rows in the outbox, stops waiting when none is left, and when the count has not moved for longer than
the dispatch lease it starts one more ``dispatch-run`` (a sweep) which, like every dispatcher, first takes back
rows whose lease expired (never attempted: sent; maybe attempted: ``unknown``, settled by ``sync-engagement``
from the provider's records, see docs/delivery.md). The lease is ``MEMBERCARE_DISPATCH_LEASE_SECONDS``
(default: the dispatcher's five minutes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from prefect import flow
from prefect.utilities.annotations import quote

from flows.common import engine_for, resolved_env, run_logger, settings_from
from membercare.campaigns.dispatch import DispatchOutcome
from membercare.delivery.dispatcher import DispatchConfig
from membercare.timeutil import utcnow

DISPATCH_DEPLOYMENT = "dispatch-run/dispatch-run"
LEASE_VARIABLE = "MEMBERCARE_DISPATCH_LEASE_SECONDS"
MAX_SWEEPS = 5


def dispatch_lease(env: dict[str, str] | None = None) -> timedelta:
    """The lease after which a ``sending`` row is taken back from a dispatcher presumed dead."""
    value = (env if env is not None else os.environ).get(LEASE_VARIABLE)
    return timedelta(seconds=float(value)) if value else DispatchConfig().lease


@flow(name="dispatch-run", log_prints=False)
def dispatch_run(run_id: int, channels: list[str] | None = None, wait_for_deferred_s: float = 0.0,
                 resume: bool = False) -> dict[str, Any]:
    """Send the run's due rows with one dispatcher (shared rate limits) until nothing is due within
    ``wait_for_deferred_s``; ``channels``: the campaign's channels (each must be configured; default: every
    channel configured in the worker's environment)."""
    from channels.registry import build_channels, close_channels
    from flows.campaign import build_adapters, dispatch, limiters_for, local_rate_config
    from membercare.models import Channel

    logger = run_logger()
    env = resolved_env()
    settings = settings_from(env)
    adapters = build_adapters(env, channels) if channels is not None else build_channels(env)
    channels = [Channel(c).value for c in adapters]
    try:
        limiters = limiters_for(channels, logger)
        config = DispatchConfig(rate_limits=local_rate_config(adapters, limiters).rate_limits,
                                lease=dispatch_lease(env), wait_for_deferred=wait_for_deferred_s)
        out = dispatch(settings, run_id, quote(adapters), quote(limiters), None, 1, config=quote(config),
                       resume=resume)
    finally:
        close_channels(adapters)
    # One line per dispatch-run with its own count: the per-worker split of a fanned-out run, in the run's logs.
    logger.info("dispatch-run on run %s: sent %d (outcomes %s)%s", run_id, out.outcomes.get("sent", 0),
                dict(sorted(out.outcomes.items())), f", stopped: {out.stop_reason}" if out.stop_reason else "")
    return {"run_id": run_id, "attempts": out.attempts, "outcomes": out.outcomes, "status": out.status,
            "stop_reason": out.stop_reason, "recovered_unknown": out.recovered_unknown}


def unsettled(engine, run_id: int, within_s: float = 0.0) -> tuple[int, int, str | None]:
    """(rows due now or within ``within_s``, rows being sent, the reason if the run is paused or cancelled)."""
    from membercare.delivery.models import CLAIMABLE_STATES, CampaignRun, OutboxMessage, OutboxState, RunStatus

    o, r = OutboxMessage.__table__, CampaignRun.__table__
    due = utcnow() + timedelta(seconds=within_s)
    with engine.connect() as conn:
        sending = conn.execute(sa.select(sa.func.count()).select_from(o).where(
            o.c.run_id == run_id, o.c.state == OutboxState.SENDING.value)).scalar_one()
        claimable = conn.execute(sa.select(sa.func.count()).select_from(o).where(
            o.c.run_id == run_id, o.c.state.in_(CLAIMABLE_STATES),
            sa.or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at <= due))).scalar_one()
        status, reason = conn.execute(sa.select(r.c.status, r.c.status_reason).where(r.c.id == run_id)).one()
    stopped = status in (RunStatus.PAUSED.value, RunStatus.CANCELLED.value)
    return int(claimable), int(sending), (reason or str(status)) if stopped else None


class _Watch:
    """The fan-out's view of its dispatch runs: which are not final yet, the first failure, progress in time."""

    def __init__(self, stall_s: float):
        self.pending: set = set()
        self.stop: str | None = None
        self.stall_s = stall_s
        self.last = -1
        self.moved = time.monotonic()
        self.sweeps = 0
        self.waiting = 0  # runs not started yet (no worker has taken them, or still starting)

    def poll_states(self, client) -> None:
        self.waiting = 0
        for fid in list(self.pending):
            state = client.read_flow_run(fid).state
            if state is None or state.is_scheduled() or state.is_pending():
                self.waiting += 1
            elif state.is_final():
                self.pending.discard(fid)
                if not state.is_completed() and self.stop is None:
                    self.stop = f"dispatch run {fid} ended {state.type.value}: {state.message or ''}".strip()

    def stalled(self, left: int) -> bool:
        """True when ``left`` has not changed for longer than the stall time while every dispatch run had started
        (runs waiting for a worker, or starting up on a busy one, are not a stall); restarts the clock."""
        now = time.monotonic()
        if left != self.last or self.waiting:
            self.last, self.moved = left, now
            return False
        if now - self.moved > self.stall_s:
            self.moved = now
            return True
        return False


def fan_out_dispatch(settings, run_id: int, channels: list[str], runs: int, *, wait_for_deferred_s: float = 0.0,
                     resume: bool = False, on_poll: Callable[[], None] | None = None,
                     poll_s: float = 2.0) -> DispatchOutcome:
    """Start ``runs`` ``dispatch-run`` flow runs on the run and wait until its rows are settled (see the module
    docstring for dead workers). Counts come from the outbox afterwards (the summary); the outcome returned
    carries the pause reason, or the first failed dispatch run's message, as its stop reason."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    logger = run_logger()
    engine = engine_for(settings)
    params = {"run_id": run_id, "channels": channels, "wait_for_deferred_s": wait_for_deferred_s, "resume": resume}

    def start(n: int) -> set:
        return {run_deployment(DISPATCH_DEPLOYMENT, parameters=params, timeout=0).id  # type: ignore[union-attr]
                for _ in range(n)}

    watch = _Watch(dispatch_lease().total_seconds() + 5.0)
    watch.pending = start(runs)
    logger.info("run %s: %d dispatch-run flow runs started for the pool's workers", run_id, runs)
    with get_client(sync_client=True) as client:
        while True:
            watch.poll_states(client)
            if on_poll is not None:
                on_poll()
            due, sending, paused = unsettled(engine, run_id, wait_for_deferred_s)
            if paused or due + sending == 0 or (not watch.pending and sending == 0):
                watch.stop = paused or watch.stop
                break
            if watch.stalled(due + sending):
                if watch.sweeps >= MAX_SWEEPS:
                    watch.stop = watch.stop or f"{due + sending} rows still unsettled after {MAX_SWEEPS} sweeps"
                    break
                watch.sweeps += 1
                logger.warning("run %s: %d rows have not moved for %.0f s (a dispatcher's worker may be gone): "
                               "sweep %d takes back expired claims", run_id, due + sending, watch.stall_s,
                               watch.sweeps)
                watch.pending |= start(1)
            time.sleep(poll_s)
    if watch.pending:
        logger.warning("run %s: %d dispatch run(s) not finished although nothing is left to send (their worker may "
                       "be gone: their flow runs stay Running until cancelled)", run_id, len(watch.pending))
    return DispatchOutcome(run_id, status="fanned-out", stop_reason=watch.stop)


__all__ = ["DISPATCH_DEPLOYMENT", "dispatch_lease", "dispatch_run", "fan_out_dispatch", "unsettled"]
