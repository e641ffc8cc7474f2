"""Dispatch: claim outbox rows, send them through the channel adapters, record every outcome.

The guarantees rest on one ordering: **a row is committed as ``sending`` before its provider call**,
and its outcome is committed right after. So at any instant a message is in one of three situations:
not yet claimed (planned/deferred: it will be sent, by this or another dispatcher), claimed and maybe
in flight (sending: if the process dies now, the row becomes ``unknown`` and is reconciled, never
blindly resent; see :mod:`reconcile`), or settled.

This module is the public API (:class:`Dispatcher`, :class:`DispatchConfig`, :class:`DispatchReport`,
:class:`RunPaused`) and the run loop that sequences the dispatcher's parts; each part's module states the
guarantees of its step:

* **Claiming** and the **pre-send checks** (:mod:`membercare.delivery.dispatch_claim`): one
  ``UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING`` statement per batch under a claim token of its own;
  consent, suppression, quiet hours and the address are checked for the whole batch.
* **The send gate** and the **pacing** of provider calls (:mod:`membercare.delivery.dispatch_send`,
  :mod:`membercare.delivery.gate`): right before each provider call consent, suppression, the run's pause
  and the global kill switch are checked again and ``attempt_started_at`` is committed. A claimed row that
  never passed the gate was never attempted: after a crash it is sent, not lost.
* **Sending**: a fixed pool of worker threads (:mod:`membercare.delivery.dispatch_pool`, bounded
  concurrency). Rows of one content on a channel whose adapter can send many in one request (LINE
  multicast) share a request (:mod:`membercare.delivery.dispatch_batch`); each still passes the gate.
  The main thread (:meth:`Dispatcher.dispatch`) keeps the pool fed by claiming the next batch
  when the in-flight count falls to half a batch.
* **Outcomes**, their **recording** guarded by the claim token, and the **error budget**
  (:mod:`membercare.delivery.dispatch_outcomes`).
* **The run's state**: started or resumed, paused, completed (:mod:`membercare.delivery.dispatch_run`).
* **Database faults**: every transaction runs through :func:`membercare.db.in_transaction`, which runs it
  again from the start after a deadlock or a dropped connection (every statement here is conditional on
  the row's state, so a rerun is harmless); buffered outcomes are kept until written.
  ``ConfigurationError`` -> the run stops loudly: the affected and not-yet-sent rows go back to planned,
  the run is paused with the reason, and the error is re-raised.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare import signals
from membercare.db import in_transaction
from membercare.delivery.contract import ChannelAdapter
from membercare.delivery.dispatch_batch import BatchJob, InFlight, finish_batch, group_batches, members_of
from membercare.delivery.dispatch_claim import Claimer
from membercare.delivery.dispatch_outcomes import ErrorBudget, Outcomes, record_outcomes
from membercare.delivery.dispatch_pool import SendPool, drain
from membercare.delivery.dispatch_run import finish_run, next_due, pause_run, run_status, start_run
from membercare.delivery.dispatch_send import GatedSender
from membercare.delivery.dispatch_types import DROP, DispatchConfig, DispatchReport, Job, Outcome, RunPaused
from membercare.delivery.models import RunStatus
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.delivery.ratelimit import TokenBucket, Unlimited
from membercare.delivery.reconcile import ProviderRecords, recover_stale
from membercare.errors import ConfigurationError
from membercare.models import Channel
from membercare.timeutil import utcnow

__all__ = ["DispatchConfig", "DispatchReport", "Dispatcher", "RunPaused"]

log = logging.getLogger(__name__)  # the dispatcher's parts log under this name too


class Dispatcher:
    """Sends one run's outbox rows. Several dispatchers may work on one run concurrently (PostgreSQL).

    Collaborators are injected so that tests run with in-process fake adapters and a fake clock:
    ``adapters`` maps a channel to a :class:`ChannelAdapter`; ``clock`` returns aware UTC datetimes;
    ``sleep`` and ``rng`` drive waiting and backoff jitter. ``records`` (optional) is consulted before a
    transactional message is resent after an ambiguous failure: found there, it is settled as sent.
    ``limiters`` (channel -> rate limiter, metering entry to the send gate) may be replaced per channel
    after construction with :meth:`use_limiters`, e.g. by limiters shared between processes.
    """

    def __init__(self, engine: Engine, adapters: Mapping[str, ChannelAdapter], *,
                 config: DispatchConfig | None = None, policy: PolicySettings | None = None,
                 clock: Callable[[], datetime] = utcnow, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, worker_id: str | None = None,
                 records: ProviderRecords | None = None):
        self.engine, self.adapters = engine, dict(adapters)
        self.records = records
        self.config = config or DispatchConfig()
        self._policy = policy
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()
        self.worker_id = worker_id or f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.limiters: dict[str, TokenBucket | Unlimited] = {
            ch: TokenBucket(rate, self.config.bursts.get(ch), sleep=sleep) if rate else Unlimited()
            for ch, rate in ((c.value, self.config.rate_limits.get(c.value)) for c in Channel)
        }
        # The limiters meter entry to the gate; the pacers meter the provider calls after it (see
        # GatedSender.send).
        self.pacers = {
            ch: TokenBucket(rate, self.config.bursts.get(ch), sleep=sleep)
            for ch, rate in ((c.value, self.config.rate_limits.get(c.value)) for c in Channel) if rate
        }
        self._outcomes = Outcomes(self.config, clock, self.rng, self.limiters, self.pacers)
        self._claimer = Claimer(engine, self.worker_id, self.adapters, self._outcomes, clock, records)
        self._sender = GatedSender(engine, self.adapters, self.config, self._outcomes, self.limiters, self.pacers,
                                   clock, sleep, gate_batch=self._gate_batch)

    def use_limiters(self, limiters: Mapping[str, Any]) -> None:
        """Meter these channels' entry to the gate with ``limiters`` (``acquire``, ``reserve``, ``pause``).

        A limiter with a ``rate`` (per second) also gets a local pacer at that rate after the gate if the
        channel has none: a limiter shared between workers hands out slots a chunk at a time (a tenth of a
        second's worth), which would otherwise leave this worker as one burst."""
        for channel, limiter in limiters.items():
            ch = str(Channel(channel).value)
            self.limiters[ch] = limiter
            rate = getattr(limiter, "rate", None)
            if rate and ch not in self.pacers:
                self.pacers[ch] = TokenBucket(float(rate), self.config.bursts.get(ch), sleep=self.sleep)

    def _gate_batch(self, jobs: Sequence[Job]) -> dict[Job, Any]:
        """The send gate for one group of jobs (:meth:`GatedSender.gate_batch`). The worker threads reach
        the gate through this method, so a subclass can observe or delay it (tests stall it)."""
        return self._sender.gate_batch(jobs)

    # ------------------------------------------------------------------------------------------------- run

    def dispatch(self, run_id: int, *, resume: bool = False) -> DispatchReport:
        """Send every due row of the run; returns when nothing is due (or the run was stopped)."""
        t0 = time.monotonic()
        rep = DispatchReport(run_id, self.worker_id)
        cfg = self.config
        policy = self._policy or in_transaction(self.engine, load_policy)
        self._sender.begin(run_id, policy)
        run = start_run(self.engine, run_id, resume, self.clock())
        recovered = recover_stale(self.engine, lease=cfg.lease, run_id=run_id, now=self.clock())
        rep.recovered_unknown, rep.recovered_unattempted = recovered.unknown, recovered.unattempted
        budget = ErrorBudget(run.error_budget, cfg.error_window, cfg.error_min_samples)
        inflight = InFlight()
        completed: queue.SimpleQueue[Job] = queue.SimpleQueue()
        buffer: list[Outcome] = []
        last_flush = time.monotonic()
        stop: str | None = None
        config_error: ConfigurationError | None = None
        drained = False
        asynchronous = cfg.transport == "async"
        # A few threads suffice when every adapter answers on the loop; one that blocks keeps a thread per call.
        few = asynchronous and all(callable(getattr(a, "send_async", None)) for a in self.adapters.values())
        pool = SendPool(cfg.workers, self._sender.send, completed, asynchronous=asynchronous,
                        threads=min(cfg.workers, cfg.gate_threads) if few else cfg.workers)
        self._sender.handoff = pool.handoff
        try:
            while True:
                if stop is None and not drained and inflight.rows <= cfg.batch_size // 2:
                    stop, claim_error, drained = self._top_up(run, policy, buffer, inflight, pool)
                    config_error = config_error or claim_error
                if inflight:
                    # Finished jobs arrive on a queue (O(1) per message, nothing registered per job).
                    done = drain(completed, cfg.flush_interval)
                    for job in done:
                        if job not in inflight:  # cancelled and released below already
                            continue
                        inflight.discard(job)
                        failed_config = self._finished(job, budget, rep, buffer)
                        config_error = config_error or failed_config
                    if stop is None:
                        stop = self._stop_reason(run_id, config_error, budget, rep)
                    if stop is not None:
                        self._cancel_queued(inflight, pool, buffer)
                now_m = time.monotonic()
                if buffer and (len(buffer) >= cfg.flush_every or now_m - last_flush >= cfg.flush_interval
                               or not inflight):
                    self._flush(buffer, rep)
                    buffer = []
                    last_flush = now_m
                if inflight:
                    continue
                if stop is not None:
                    break
                if drained:
                    if not self._wait_for_deferred(run_id, rep):
                        break
                    drained = False
        finally:
            self._settle_leftovers(inflight, pool, buffer)
            if buffer:
                self._flush(buffer, rep)
            rep.status = finish_run(self.engine, run_id, config_error, self.clock())
            rep.elapsed = time.monotonic() - t0
            rep.gate_commits, rep.gate_items = self._sender.gate.commits, self._sender.gate.items
        rep.stop_reason = stop
        _signal_dispatched(run_id, rep)
        if config_error is not None:
            raise config_error
        return rep

    def _top_up(self, run: sa.Row[Any], policy: PolicySettings, buffer: list[Outcome], inflight: InFlight,
                pool: SendPool) -> tuple[str | None, ConfigurationError | None, bool]:
        """Claim the next batch of due rows and hand them to the send pool. Returns (why the run must stop,
        the configuration error that stops it, whether nothing was left to claim)."""
        if run_status(self.engine, run.id) != RunStatus.DISPATCHING:
            return "run is no longer dispatching (paused by another dispatcher or an operator)", None, False
        try:
            jobs = self._claimer.claim(run, self.config.batch_size, policy, buffer)
        except ConfigurationError as exc:
            return f"configuration error: {exc}", exc, not buffer
        for job in group_batches(jobs, self.adapters):
            inflight.add(job)
            pool.submit(job)
        return None, None, not jobs and not buffer

    def _cancel_queued(self, inflight: InFlight, pool: SendPool, buffer: list[Outcome]) -> None:
        """The run stops: release every job the send pool has not started."""
        for job in list(inflight):
            if pool.cancel(job):
                inflight.discard(job)
                buffer.extend(self._outcomes.release(m, "not sent: dispatch stopped") for m in members_of(job))

    def _wait_for_deferred(self, run_id: int, rep: DispatchReport) -> bool:
        """Nothing is due now: sleep until the next deferred row is due when that is within
        ``config.wait_for_deferred`` and return True; else return False (the dispatch pass ends)."""
        due = next_due(self.engine, run_id, self.clock)
        rep.next_due_at = due
        if due is None:
            return False
        delay = (due - self.clock()).total_seconds()
        if delay > self.config.wait_for_deferred:
            return False
        self.sleep(max(delay, 0.0) + 0.001)
        return True

    def _finished(self, job: Job, budget: ErrorBudget, rep: DispatchReport,
                  buffer: list[Outcome]) -> ConfigurationError | None:
        """Record one finished job's outcome in ``buffer``; returns its configuration error, if that is what
        it raised (the row is then released, not attempted)."""
        if isinstance(job, BatchJob):
            return finish_batch(job, self._outcomes, budget, rep, buffer, self._take_gated)
        result = job.result
        if job.gated is not None:  # stopped by the send gate: never attempted
            self._take_gated(job, buffer)
            return None
        if isinstance(job.error, ConfigurationError):
            buffer.append(self._outcomes.release(job, "not sent: configuration error"))
            return job.error
        if isinstance(job.error, Exception):  # an adapter bug: we cannot know whether it was sent
            log.error("adapter %s raised for message %s", job.channel, job.row["message_id"], exc_info=job.error)
            result = job.error
        elif job.error is not None:  # KeyboardInterrupt/SystemExit in a worker
            raise job.error
        rep.attempts += 1
        out = self._outcomes.outcome(job, result)
        if out.budget is not None:
            budget.record(out.budget, job.channel)
        buffer.append(out)
        return None

    def _stop_reason(self, run_id: int, config_error: ConfigurationError | None, budget: ErrorBudget,
                     rep: DispatchReport) -> str | None:
        """Why the run must stop now (a configuration error, the send gate, a spent error budget, which also
        pauses the run), or None."""
        if config_error is not None:
            return f"configuration error: {config_error}"
        if self._sender.stop is not None:
            return self._sender.stop
        if budget.spent():
            stop = (f"error budget spent: {budget.failure_rate:.0%} of the last "
                    f"{budget.samples} sends failed (budget {budget.budget:.0%})")
            rep.resume_at = pause_run(self.engine, run_id, stop, self.clock(),
                                      auto_resume_after=self.config.auto_resume_after,
                                      max_auto_resumes=self.config.max_auto_resumes, auto_resume=True)
            _signal_pause(run_id, stop, budget, rep.resume_at)
            return stop
        return None

    def _settle_leftovers(self, inflight: InFlight, pool: SendPool, buffer: list[Outcome]) -> None:
        """The loop has ended: stop the send pool; of the jobs still in flight, anything finished after an
        exception in the loop is recorded and cancelled work is released."""
        for job in inflight:
            pool.cancel(job)
        pool.shutdown()
        for job in list(inflight):
            if job.cancelled:
                buffer.extend(self._outcomes.release(m, "not sent: dispatcher stopped") for m in members_of(job))
            elif isinstance(job, BatchJob):
                if job.error is None:
                    finish_batch(job, self._outcomes, None, None, buffer, self._take_gated)
            elif job.gated is not None:
                self._take_gated(job, buffer)
            elif job.error is None:
                buffer.append(self._outcomes.outcome(job, job.result))

    def _take_gated(self, job: Job, buffer: list[Outcome]) -> None:
        """The send gate stopped ``job`` before its call: buffer its outcome, or forget a row that is no longer
        ours (DROP: recovery took it back, so nothing of ours is left to record)."""
        if job.gated is DROP:
            self._claimer.forget((job.row["id"],))
        else:
            buffer.append(job.gated)

    def _flush(self, outcomes: list[Outcome], rep: DispatchReport) -> None:
        record_outcomes(self.engine, outcomes, rep)
        self._claimer.forget(out.id for out in outcomes)


def _signal_pause(run_id: int, reason: str, budget: ErrorBudget, resume_at: datetime | None) -> None:
    """The error budget paused the run: say so, and name the provider when most failures were on one channel
    (an outage rather than bad data spread over all of them)."""
    run = signals.run_resource(run_id)
    signals.emit(signals.RUN_PAUSED, run, {"reason": reason, "cause": "error_budget",
                                           "resumes_at": resume_at.isoformat() if resume_at else None})
    by_channel = budget.failures_by_channel()
    if by_channel:
        channel, failed = max(by_channel.items(), key=lambda kv: kv[1])
        if failed * 2 > sum(by_channel.values()):
            signals.emit(signals.PROVIDER_OUTAGE, run, {"channel": channel, "failed": failed,
                                                        "samples": budget.samples, "reason": reason})


def _signal_dispatched(run_id: int, rep: DispatchReport) -> None:
    """A dispatch pass that called providers ended: its counts, for operations (idle passes say nothing)."""
    if rep.attempts:
        signals.emit(signals.CAMPAIGN_DISPATCHED, signals.run_resource(run_id), {
            "status": rep.status, "attempts": rep.attempts, "sent": rep.outcomes.get("sent", 0),
            "failed": rep.outcomes.get("failed", 0), "stop_reason": rep.stop_reason})
