"""Dispatch: claim outbox rows, send them through the channel adapters, record every outcome.

The guarantees rest on one ordering: **a row is committed as ``sending`` before its provider call**,
and its outcome is committed right after. So at any instant a message is in one of three situations:
not yet claimed (planned/deferred: it will be sent, by this or another dispatcher), claimed and maybe
in flight (sending: if the process dies now, the row becomes ``unknown`` and is reconciled, never
blindly resent; see :mod:`reconcile`), or settled.

Mechanics:

* **Claiming** (:meth:`Dispatcher._claim`): one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE
  SKIP LOCKED) RETURNING ...`` statement. On PostgreSQL, concurrent dispatchers on one run skip each
  other's locked rows, so no row is claimed twice. On SQLite the statement is the transaction's first
  and only one, so it takes the database write lock for its whole read-and-update (SQLite has one writer).
* **Pre-send checks** per claimed batch, set-based: consent and suppression are re-checked (an
  unsubscribe that arrived after planning wins), quiet hours are applied at the actual send time, and
  the address is resolved from the member (the ledger holds none).
* **The send gate** (:mod:`membercare.delivery.gate`), right before each provider call: consent,
  suppression, the run's pause and the global kill switch are checked again (from a versioned view,
  reloaded only when something that can forbid a send changed) and ``attempt_started_at`` is committed.
  A claimed row that never passed the gate was never attempted: after a crash it is sent, not lost.
* **Sending**: a fixed pool of worker threads (bounded concurrency), each taking a token from its
  channel's :class:`~membercare.delivery.ratelimit.TokenBucket` before calling ``adapter.send``. The main
  thread keeps the pool fed by claiming the next batch when the in-flight count falls to half a batch.
* **Recording**: results are written in small batches (every ``flush_every`` results or
  ``flush_interval`` seconds), guarded by ``state = 'sending' AND claimed_by = <this claim>``. Every
  claim has its own token (``<worker id>/<claim number>``): a row that recovery took back and this same
  dispatcher claimed again is then never sent or recorded through its older claim.
* **Outcomes**: ``Accepted`` -> sent. ``TransientFailure`` -> deferred with exponential backoff and full
  jitter, never earlier than ``Retry-After``; throttling (429) pauses the channel's bucket, does not
  count as a failure of the message and does not use up its retries. An *ambiguous* ``TransientFailure``
  (the provider may have accepted it) -> ``unknown`` for marketing (never resent; reconciliation settles
  it), deferred by at least ``ambiguous_retry_delay`` for transactional, and looked up in ``records``
  before the resend (see :meth:`Dispatcher._ambiguous`). ``PermanentFailure`` -> the next
  channel of the fallback chain (content was rendered at planning) when ``fallback`` is allowed, else
  failed; an unregistered token is invalidated in ``devices``, an invalid or opted-out address is added
  to the suppression list.
* **Database faults**: every transaction runs through :func:`membercare.db.in_transaction`, which runs it
  again from the start after a deadlock or a dropped connection (every statement here is conditional on
  the row's state, so a rerun is harmless); buffered outcomes are kept until written.
  ``ConfigurationError`` -> the run stops loudly: the affected and not-yet-sent rows go back to planned,
  the run is paused with the reason, and the error is re-raised.
* **Error budget**: when more than ``run.error_budget`` of the last ``error_window`` provider answers
  were failures, the run is paused; remaining claimed rows go back to planned. Counted as failures:
  transient failures other than throttling, permanent rejections of content or account (``rejected``,
  ``blocked``) and adapter exceptions. Not counted: throttling, and recipient-level permanent failures
  (invalid recipient, opted out, unregistered token), which are list attrition, not a broken run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction, insert_for
from membercare.delivery.contract import (
    Accepted,
    ChannelAdapter,
    Content,
    FailureReason,
    OutboundMessage,
    PermanentFailure,
    SendResult,
    TransientFailure,
    redact,
)
from membercare.delivery.gate import GroupCommit, lock_for_gate, read_gate, read_version
from membercare.delivery.models import (
    CLAIMABLE_STATES,
    CampaignRun,
    Decision,
    OutboxMessage,
    OutboxState,
    RunStatus,
    Suppression,
    SuppressionReason,
    address_hash,
    decode_contents,
)
from membercare.delivery.planner import refresh_run_counts
from membercare.delivery.policies import PolicySettings, load_policy, member_zone, quiet_hours_until
from membercare.delivery.ratelimit import TokenBucket, Unlimited
from membercare.delivery.reconcile import ProviderRecords, recover_stale
from membercare.delivery.routing import MemberContext, load_contexts, route
from membercare.errors import ConfigurationError, InputError
from membercare.models import Channel, Device, Purpose
from membercare.timeutil import UTC, utcnow

log = logging.getLogger(__name__)


class RunPaused(InputError):
    """The run is paused (error budget, configuration error or an operator); resume it explicitly."""


@dataclass(frozen=True)
class DispatchConfig:
    workers: int = 32  # concurrent provider calls
    batch_size: int = 200  # rows per claim
    rate_limits: Mapping[str, float] = field(default_factory=dict)  # channel -> messages/s (absent: unlimited)
    bursts: Mapping[str, float] = field(default_factory=dict)
    max_transient_failures: int = 8  # then failed (throttling does not count)
    backoff_base: float = 2.0  # seconds; attempt n waits up to base * 2**(n-1), capped
    backoff_max: float = 600.0
    error_window: int = 200
    error_min_samples: int = 50
    flush_every: int = 100
    flush_interval: float = 0.2
    # Keep running while the next deferred row is due within this many seconds (else return and let
    # the scheduler call again at report.next_due_at).
    wait_for_deferred: float = 0.0
    lease: timedelta = timedelta(minutes=5)  # sending rows older than this are from a dead process
    # Transactional messages after an ambiguous failure (the provider may have accepted them) are retried
    # no earlier than this: it gives provider events carrying our message id time to arrive and settle
    # the row (mark_sent_from_event), and the provider records (``records=``) are checked before resending.
    ambiguous_retry_delay: float = 30.0
    # After the error budget paused the run: try again automatically after this many seconds (doubled
    # after each further pause, at most ``max_auto_resumes`` times). The campaign's ``auto_resume_after``
    # (stored on the run) wins; None for both: an operator resumes it.
    auto_resume_after: float | None = None
    max_auto_resumes: int = 5
    # A send whose pacing wait after the gate exceeded this many seconds passes the gate again before its
    # provider call, so the gate-to-request window stays short (see Dispatcher._send).
    gate_slack: float = 0.1


@dataclass
class DispatchReport:
    run_id: int
    worker: str
    outcomes: Counter = field(default_factory=Counter)  # sent, deferred, throttled, failed, fallback, ...
    attempts: int = 0
    status: str = ""
    stop_reason: str | None = None
    next_due_at: datetime | None = None
    recovered_unknown: int = 0
    recovered_unattempted: int = 0
    elapsed: float = 0.0
    # The run was paused by the error budget and will be resumed automatically from this time on.
    resume_at: datetime | None = None
    gate_commits: int = 0  # send-gate transactions, and the messages they admitted or stopped
    gate_items: int = 0


# The gate's verdicts besides an outcome: send now, or the row is no longer ours (say nothing about it).
GO = object()
DROP = object()


@dataclass(eq=False)  # identity: jobs are keys of the in-flight set
class _Job:
    row: Mapping[str, Any]
    ctx: MemberContext | None
    channel: str
    chain_rest: tuple[str, ...]
    contents: dict[str, Content]
    message: OutboundMessage | None = None
    view_version: int = 0  # delivery_controls.version read before ``ctx`` was loaded
    gated: Any = None  # the send gate's outcome when it stopped the row before the provider call
    # Filled by _SendPool: the adapter's answer or the exception it raised; ``started``/``cancelled`` decide
    # whether a job may still be withdrawn (never once its provider call may have begun).
    result: Any = None
    error: BaseException | None = None
    started: bool = False
    cancelled: bool = False


@dataclass
class _Outcome:
    id: int
    values: dict[str, Any]
    claim: str = ""  # the claim token the row is held under (recording is guarded by it)
    budget: bool | None = None  # True failure, False success, None not counted
    kind: str = ""
    side_effect: Callable[[Connection], None] | None = None


def _outcome_for(row: Mapping[str, Any], values: dict[str, Any], **kw: Any) -> _Outcome:
    return _Outcome(row["id"], values, claim=row["claim"], **kw)


def _take_write_lock(conn: Connection, run_id: int, now: datetime) -> None:
    """Make a read-then-write transaction start with a write. On SQLite (WAL) a transaction that read first
    cannot upgrade to a writer once another process has committed ("database is locked" at once, no busy
    wait), which concurrent dispatchers on one run would hit; on PostgreSQL it locks the run's row, which
    serialises the few run-level updates of concurrent dispatchers."""
    r = CampaignRun.__table__
    conn.execute(sa.update(r).where(r.c.id == run_id).values(updated_at=now))


class _SendPool:
    """``workers`` threads that run ``send(job)`` and put each finished job on ``completed``.

    A minimal replacement for ``ThreadPoolExecutor`` + ``Future`` on the hot path: a ``Future`` allocates a
    ``threading.Condition`` and runs done-callbacks under locks, which profiling showed as about a tenth of
    the dispatching process's CPU at a thousand messages a second. Jobs carry their own result; ``cancel``
    withdraws a job only if no worker has started it (its provider call can then never happen).
    """

    def __init__(self, workers: int, send: Callable[[_Job], SendResult | None], completed: queue.SimpleQueue[_Job]):
        self._send, self._completed = send, completed
        self._work: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, name=f"mc-dispatch-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: _Job) -> None:
        self._work.put(job)

    def cancel(self, job: _Job) -> bool:
        """Withdraw ``job`` if no worker started it yet; True when withdrawn (it is then never sent)."""
        with self._lock:
            if job.started:
                return job.cancelled
            job.cancelled = True
            return True

    def shutdown(self) -> None:
        """Let the workers finish what they started (queued, non-cancelled jobs still run) and stop."""
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()

    def _worker(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            with self._lock:
                if job.cancelled:
                    continue
                job.started = True
            try:
                job.result = self._send(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the dispatching thread
                job.error = exc
            self._completed.put(job)


def _drain(completed: queue.SimpleQueue[_Job], timeout: float) -> list[_Job]:
    """Wait up to ``timeout`` for one finished job, then take every other one already there."""
    try:
        done = [completed.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(completed.get_nowait())
        except queue.Empty:
            return done


class ErrorBudget:
    """Sliding window over the last ``window`` provider answers; throttling is never recorded here."""

    def __init__(self, budget: float, window: int, min_samples: int):
        self.budget, self.min_samples = budget, min_samples
        self._window: deque[bool] = deque(maxlen=window)

    def record(self, failed: bool) -> None:
        self._window.append(failed)

    @property
    def failure_rate(self) -> float:
        return sum(self._window) / len(self._window) if self._window else 0.0

    def spent(self) -> bool:
        return len(self._window) >= self.min_samples and self.failure_rate > self.budget


class Dispatcher:
    """Sends one run's outbox rows. Several dispatchers may work on one run concurrently (PostgreSQL).

    Collaborators are injected so that tests run with in-process fake adapters and a fake clock:
    ``adapters`` maps a channel to a :class:`ChannelAdapter`; ``clock`` returns aware UTC datetimes;
    ``sleep`` and ``rng`` drive waiting and backoff jitter. ``records`` (optional) is consulted before a
    transactional message is resent after an ambiguous failure: found there, it is settled as sent.
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
        self.limiters = {
            ch: TokenBucket(rate, self.config.bursts.get(ch), sleep=sleep) if rate else Unlimited()
            for ch, rate in ((c.value, self.config.rate_limits.get(c.value)) for c in Channel)
        }
        # The limiters meter entry to the gate; the pacers meter the provider calls after it (see _send).
        self.pacers = {
            ch: TokenBucket(rate, self.config.bursts.get(ch), sleep=sleep)
            for ch, rate in ((c.value, self.config.rate_limits.get(c.value)) for c in Channel) if rate
        }
        self._rng_lock = threading.Lock()
        self._gate: GroupCommit[_Job, Any] = GroupCommit(self._gate_batch)
        self._run_id: int | None = None
        self._active_policy: PolicySettings | None = None
        self._gate_stop: str | None = None
        self._held: set[int] = set()  # ids of rows this dispatcher claimed and has not recorded yet
        self._claims = 0

    # ------------------------------------------------------------------------------------------------- run

    def dispatch(self, run_id: int, *, resume: bool = False) -> DispatchReport:
        """Send every due row of the run; returns when nothing is due (or the run was stopped)."""
        t0 = time.monotonic()
        rep = DispatchReport(run_id, self.worker_id)
        cfg = self.config
        policy = self._policy or in_transaction(self.engine, load_policy)
        self._run_id, self._active_policy, self._gate_stop = run_id, policy, None
        run = self._start(run_id, resume)
        recovered = recover_stale(self.engine, lease=cfg.lease, run_id=run_id, now=self.clock())
        rep.recovered_unknown, rep.recovered_unattempted = recovered.unknown, recovered.unattempted
        budget = ErrorBudget(run.error_budget, cfg.error_window, cfg.error_min_samples)
        inflight: set[_Job] = set()
        completed: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        buffer: list[_Outcome] = []
        last_flush = time.monotonic()
        stop: str | None = None
        config_error: ConfigurationError | None = None
        drained = False
        pool = _SendPool(cfg.workers, self._send, completed)
        try:
            while True:
                if stop is None and not drained and len(inflight) <= cfg.batch_size // 2:
                    stop, claim_error, drained = self._top_up(run, policy, buffer, inflight, pool)
                    config_error = config_error or claim_error
                if inflight:
                    # Finished jobs arrive on a queue (O(1) per message, nothing registered per job).
                    done = _drain(completed, cfg.flush_interval)
                    for job in done:
                        if job not in inflight:  # cancelled and released below already
                            continue
                        inflight.discard(job)
                        failed_config = self._finished(job, policy, budget, rep, buffer)
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
            self._settle_leftovers(inflight, pool, policy, buffer)
            if buffer:
                self._flush(buffer, rep)
            rep.status = self._finish(run_id, config_error)
            rep.elapsed = time.monotonic() - t0
            rep.gate_commits, rep.gate_items = self._gate.commits, self._gate.items
        rep.stop_reason = stop
        if config_error is not None:
            raise config_error
        return rep

    def _top_up(self, run, policy: PolicySettings, buffer: list[_Outcome], inflight: set[_Job],
                pool: _SendPool) -> tuple[str | None, ConfigurationError | None, bool]:
        """Claim the next batch of due rows and hand them to the send pool. Returns (why the run must stop,
        the configuration error that stops it, whether nothing was left to claim)."""
        if self._run_status(run.id) != RunStatus.DISPATCHING:
            return "run is no longer dispatching (paused by another dispatcher or an operator)", None, False
        try:
            jobs = self._claim(run, self.config.batch_size, policy, buffer)
        except ConfigurationError as exc:
            return f"configuration error: {exc}", exc, not buffer
        for job in jobs:
            inflight.add(job)
            pool.submit(job)
        return None, None, not jobs and not buffer

    def _cancel_queued(self, inflight: set[_Job], pool: _SendPool, buffer: list[_Outcome]) -> None:
        """The run stops: release every job the send pool has not started."""
        for job in list(inflight):
            if pool.cancel(job):
                inflight.discard(job)
                buffer.append(self._release(job, "not sent: dispatch stopped"))

    def _wait_for_deferred(self, run_id: int, rep: DispatchReport) -> bool:
        """Nothing is due now: sleep until the next deferred row is due when that is within
        ``config.wait_for_deferred`` and return True; else return False (the dispatch pass ends)."""
        next_due = self._next_due(run_id)
        rep.next_due_at = next_due
        if next_due is None:
            return False
        delay = (next_due - self.clock()).total_seconds()
        if delay > self.config.wait_for_deferred:
            return False
        self.sleep(max(delay, 0.0) + 0.001)
        return True

    def _finished(self, job: _Job, policy: PolicySettings, budget: ErrorBudget, rep: DispatchReport,
                  buffer: list[_Outcome]) -> ConfigurationError | None:
        """Record one finished job's outcome in ``buffer``; returns its configuration error, if that is what
        it raised (the row is then released, not attempted)."""
        result = job.result
        if job.gated is not None:  # stopped by the send gate: never attempted
            self._take_gated(job, buffer)
            return None
        if isinstance(job.error, ConfigurationError):
            buffer.append(self._release(job, "not sent: configuration error"))
            return job.error
        if isinstance(job.error, Exception):  # an adapter bug: we cannot know whether it was sent
            log.error("adapter %s raised for message %s", job.channel, job.row["message_id"], exc_info=job.error)
            result = job.error
        elif job.error is not None:  # KeyboardInterrupt/SystemExit in a worker
            raise job.error
        rep.attempts += 1
        out = self._outcome(job, result, policy)
        if out.budget is not None:
            budget.record(out.budget)
        buffer.append(out)
        return None

    def _stop_reason(self, run_id: int, config_error: ConfigurationError | None, budget: ErrorBudget,
                     rep: DispatchReport) -> str | None:
        """Why the run must stop now (a configuration error, the send gate, a spent error budget, which also
        pauses the run), or None."""
        if config_error is not None:
            return f"configuration error: {config_error}"
        if self._gate_stop is not None:
            return self._gate_stop
        if budget.spent():
            stop = (f"error budget spent: {budget.failure_rate:.0%} of the last "
                    f"{len(budget._window)} sends failed (budget {budget.budget:.0%})")
            rep.resume_at = self._pause(run_id, stop, auto_resume=True)
            return stop
        return None

    def _settle_leftovers(self, inflight: set[_Job], pool: _SendPool, policy: PolicySettings,
                          buffer: list[_Outcome]) -> None:
        """The loop has ended: stop the send pool; of the jobs still in flight, anything finished after an
        exception in the loop is recorded and cancelled work is released."""
        for job in inflight:
            pool.cancel(job)
        pool.shutdown()
        for job in list(inflight):
            if job.cancelled:
                buffer.append(self._release(job, "not sent: dispatcher stopped"))
            elif job.gated is not None:
                self._take_gated(job, buffer)
            elif job.error is None:
                buffer.append(self._outcome(job, job.result, policy))

    def _start(self, run_id: int, resume: bool):
        r = CampaignRun.__table__
        now = self.clock()

        def work(conn: Connection):
            _take_write_lock(conn, run_id, now)
            run = conn.execute(sa.select(r).where(r.c.id == run_id)).first()
            if run is None:
                raise InputError(f"no campaign run with id {run_id}")
            values: dict[str, Any] = dict(status=RunStatus.DISPATCHING.value, status_reason=None, updated_at=now,
                                          started_at=sa.func.coalesce(r.c.started_at, now), auto_resume_at=None)
            if run.status == RunStatus.PAUSED and not resume:
                due = run.auto_resume_at
                if due is None or due > now:
                    when = f"; resumes automatically at {due.isoformat()}" if due is not None else "; resume it"
                    raise RunPaused(f"run {run.campaign}/{run.occurrence} is paused: {run.status_reason}{when}")
                # Paused by the error budget with automatic resumption: probe the provider again. The budget
                # window starts empty, so a provider still down pauses the run again after a few answers.
                values["auto_resumes"] = r.c.auto_resumes + 1
                log.warning("run %s: resuming automatically after an error-budget pause (%s)", run_id,
                            run.status_reason)
            conn.execute(sa.update(r).where(r.c.id == run_id).values(**values))
            return run

        return in_transaction(self.engine, work)

    def _run_status(self, run_id: int) -> str:
        r = CampaignRun.__table__
        return in_transaction(self.engine, lambda conn: conn.execute(
            sa.select(r.c.status).where(r.c.id == run_id)).scalar_one())

    def _pause(self, run_id: int, reason: str, *, auto_resume: bool = False) -> datetime | None:
        """Pause the run; with ``auto_resume`` and ``config.auto_resume_after`` set, schedule the next probe
        (the cool-down doubles with every automatic resumption). Returns that time, if any."""
        r = CampaignRun.__table__
        cfg, now = self.config, self.clock()
        log.warning("pausing run %s: %s", run_id, reason)

        def work(conn: Connection) -> datetime | None:
            _take_write_lock(conn, run_id, now)  # SQLite: read-then-write must start as a writer
            resumes, allowed = conn.execute(sa.select(r.c.auto_resumes, r.c.auto_resume_after_s)
                                            .where(r.c.id == run_id)).one()
            after = allowed if allowed is not None else cfg.auto_resume_after  # the campaign's, else ours
            at = None
            why = reason
            if auto_resume and after is not None and resumes < cfg.max_auto_resumes:
                at = now + timedelta(seconds=after * (2 ** resumes))
                why = f"{reason}; resumes automatically at {at.isoformat()} (probe {resumes + 1} of " \
                      f"{cfg.max_auto_resumes})"
            conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == RunStatus.DISPATCHING.value).values(
                status=RunStatus.PAUSED.value, status_reason=why[:500], updated_at=now, auto_resume_at=at))
            return at

        return in_transaction(self.engine, work)

    def _finish(self, run_id: int, config_error: ConfigurationError | None) -> str:
        r, o = CampaignRun.__table__, OutboxMessage.__table__
        now = self.clock()

        def work(conn: Connection) -> str:
            _take_write_lock(conn, run_id, now)
            if config_error is not None:
                conn.execute(sa.update(r).where(r.c.id == run_id).values(
                    status=RunStatus.PAUSED.value, updated_at=now,
                    status_reason=f"configuration error: {config_error}"[:500]))
            open_rows = conn.execute(sa.select(sa.func.count()).where(
                o.c.run_id == run_id, o.c.state.in_(CLAIMABLE_STATES + (OutboxState.SENDING.value,)))).scalar_one()
            if open_rows == 0:
                conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == RunStatus.DISPATCHING.value)
                             .values(status=RunStatus.COMPLETED.value, finished_at=now, updated_at=now))
            refresh_run_counts(conn, run_id)
            return conn.execute(sa.select(r.c.status).where(r.c.id == run_id)).scalar_one()

        return in_transaction(self.engine, work)

    def _next_due(self, run_id: int) -> datetime | None:
        o = OutboxMessage.__table__
        row = in_transaction(self.engine, lambda conn: conn.execute(sa.select(
            sa.func.count().filter(o.c.next_attempt_at.is_(None)),
            sa.func.min(o.c.next_attempt_at),
        ).where(o.c.run_id == run_id, o.c.state.in_(CLAIMABLE_STATES))).one())
        if row[0]:
            return self.clock()  # planned rows exist (another dispatcher released them): due now
        if row[1] is None:
            return None
        value = row[1]
        if isinstance(value, str):  # SQLite aggregates lose the column type
            value = datetime.fromisoformat(value)
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    # ---------------------------------------------------------------------------------------------- claim

    def _claim(self, run, limit: int, policy: PolicySettings, buffer: list[_Outcome]) -> list[_Job]:
        o = OutboxMessage.__table__
        now = self.clock()
        self._claims += 1
        token = f"{self.worker_id}/{self._claims}"
        due = (sa.select(o.c.id)
               .where(o.c.run_id == run.id, o.c.state.in_(CLAIMABLE_STATES),
                      sa.or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at <= now))
               .limit(limit).with_for_update(skip_locked=True))
        stmt = (sa.update(o).where(o.c.id.in_(due.scalar_subquery()))
                .values(state=OutboxState.SENDING.value, claimed_by=token, claimed_at=now, updated_at=now,
                        attempt_started_at=None)
                .returning(o.c.id, o.c.message_id, o.c.idempotency_key, o.c.member_id, o.c.campaign, o.c.purpose,
                           o.c.channel, o.c.fallback_channels, o.c.content, o.c.attempts, o.c.transient_failures,
                           o.c.reason, o.c.reason_code, o.c.claimed_by.label("claim")))
        tries = 0

        def claim(conn: Connection) -> list[dict]:
            nonlocal tries
            tries += 1
            if tries > 1:
                # The connection dropped during an earlier try, maybe after its commit: rows it claimed for
                # us (never attempted) would otherwise wait for the lease. Hand them back first.
                self._release_orphans(conn, now)
            return [dict(r) for r in conn.execute(stmt).mappings()]

        rows = in_transaction(self.engine, claim)
        if not rows:
            return []
        self._held.update(r["id"] for r in rows)
        rows = self._settle_ambiguous(rows, buffer)
        if not rows:
            return []
        # The version is read before the view it versions: a change committed in between is then seen as
        # newer than the view, and the gate reloads it.
        version, contexts = in_transaction(self.engine, lambda conn: (
            read_version(conn), self._load_contexts(conn, rows, now, policy)))
        jobs: list[_Job] = []
        for i, row in enumerate(rows):
            ctx = contexts.get((row["member_id"], row["purpose"]))
            chain = [row["channel"], *[c for c in row["fallback_channels"].split(",") if c]]
            job = _Job(row, ctx, row["channel"], tuple(chain[1:]), decode_contents(row["content"]),
                       view_version=version)
            try:
                ready = self._prepare(job, chain, now, policy)
            except ConfigurationError:
                # Nothing of this batch was sent: hand every row back before stopping.
                buffer.extend(self._release(j, "not sent: configuration error") for j in jobs)
                buffer.extend(self._release(_Job(r, None, r["channel"], (), {}), "not sent: configuration error")
                              for r in rows[i:])
                raise
            if ready is None:
                jobs.append(job)
            else:
                buffer.append(ready)
        return jobs

    def _take_gated(self, job: _Job, buffer: list[_Outcome]) -> None:
        """The send gate stopped ``job`` before its call: buffer its outcome, or forget a row that is no longer
        ours (DROP: recovery took it back, so nothing of ours is left to record)."""
        if job.gated is DROP:
            self._held.discard(job.row["id"])
        else:
            buffer.append(job.gated)

    def _release_orphans(self, conn: Connection, now: datetime) -> None:
        o = OutboxMessage.__table__
        cond = [o.c.run_id == self._run_id, o.c.state == OutboxState.SENDING.value,
                o.c.claimed_by.startswith(f"{self.worker_id}/", autoescape=True), o.c.attempt_started_at.is_(None)]
        held = sorted(self._held)
        if held:
            cond.append(o.c.id.not_in(held))
        res = conn.execute(sa.update(o).where(*cond).values(
            state=OutboxState.PLANNED.value, claimed_by=None, claimed_at=None, updated_at=now,
            last_error="claim answer lost with a dropped database connection; never attempted"))
        if res.rowcount:
            log.warning("released %d row(s) claimed through a dropped database connection", res.rowcount)

    @staticmethod
    def _load_contexts(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime,
                       policy: PolicySettings) -> dict[tuple[int, str], MemberContext]:
        contexts: dict[tuple[int, str], MemberContext] = {}
        for purpose in {r["purpose"] for r in rows}:
            ids = sorted({r["member_id"] for r in rows if r["purpose"] == purpose})
            ctxs = load_contexts(conn, ids, purpose, now, timedelta(days=policy.push_token_max_age_days))
            for mid, ctx in ctxs.items():
                contexts[(mid, purpose)] = ctx
        return contexts

    # ------------------------------------------------------------------------------------------- the gate

    def _gate_batch(self, jobs: Sequence[_Job]) -> dict[_Job, Any]:
        """The send gate for a group of jobs (see :mod:`membercare.delivery.gate`): GO, DROP or an outcome."""
        o = OutboxMessage.__table__
        now = self.clock()
        policy = self._active_policy or PolicySettings()

        def work(conn: Connection) -> dict[_Job, Any]:
            lock_for_gate(conn)
            st = read_gate(conn, self._run_id)
            stop = None
            if st.paused_all:
                stop = f"all sending is paused ({st.paused_reason or 'kill switch'})"
            elif st.run_status != RunStatus.DISPATCHING:
                stop = f"the run is {st.run_status}" + (f" ({st.run_reason})" if st.run_reason else "")
            if stop is not None:
                self._gate_stop = self._gate_stop or stop
                return {j: self._release(j, f"not sent: {stop}") for j in jobs}
            verdicts: dict[_Job, Any] = {}
            go = [j for j in jobs if j.view_version == st.version]
            stale = [j for j in jobs if j.view_version != st.version]
            if stale:
                ctxs = self._load_contexts(conn, [j.row for j in stale], now, policy)
                for j in stale:
                    out = self._recheck(j, ctxs.get((j.row["member_id"], j.row["purpose"])))
                    if out is None:
                        j.view_version = st.version
                        go.append(j)
                    else:
                        verdicts[j] = out
            if go:
                marked: set[int] = set()
                for token in sorted({j.row["claim"] for j in go}):
                    marked.update(conn.execute(
                        sa.update(o).where(o.c.id.in_([j.row["id"] for j in go if j.row["claim"] == token]),
                                           o.c.state == OutboxState.SENDING.value, o.c.claimed_by == token)
                        .values(attempt_started_at=now).returning(o.c.id)).scalars())
                # The pre-send check at claim may have moved a row to another channel: record the channel it
                # is attempted on, so that reconciliation after a crash asks the right provider.
                moved = [j for j in go if j.channel != j.row["channel"] and j.row["id"] in marked]
                for ch in sorted({j.channel for j in moved}):
                    conn.execute(sa.update(o).where(o.c.id.in_([j.row["id"] for j in moved if j.channel == ch]))
                                 .values(channel=ch))
                for j in go:
                    verdicts[j] = GO if j.row["id"] in marked else DROP
            return verdicts

        return in_transaction(self.engine, work)

    def _recheck(self, job: _Job, ctx: MemberContext | None) -> _Outcome | None:
        """Route the job again on a fresh view; None when its channel still may carry it (address refreshed)."""
        row = job.row
        if ctx is None:
            return self._settle(job, OutboxState.SKIPPED, Decision.NO_REACHABLE_CHANNEL,
                                "member no longer exists (checked right before sending)")
        old = job.channel
        rt = route(ctx, [old, *job.chain_rest], row["purpose"])
        if not rt.chain:
            return self._settle(job, rt.state, rt.code, f"checked right before sending: {rt.reason}")
        if rt.chain[0] != old:
            dropped = "; ".join(f"{r.channel}: {r.detail}" for r in rt.rejected if r.channel == old)
            nxt = rt.chain[0]
            if nxt not in job.contents:
                return self._settle(job, OutboxState.FAILED, Decision.PERMANENT_FAILURE,
                                    f"{old} no longer allowed right before sending ({dropped}) and no rendered "
                                    f"content for {nxt}")
            job.channel, job.chain_rest = nxt, rt.chain[1:]
            # Not sent now (the rate-limit token was taken for the other channel): planned again on the next one.
            return _outcome_for(row, self._values(
                job, state=OutboxState.PLANNED, code=Decision.FALLBACK,
                reason=f"via {nxt}: {old} no longer allowed right before sending ({dropped})"), kind="fallback")
        job.ctx, job.chain_rest = ctx, rt.chain[1:]
        to = ctx.address(old) or ""
        if job.message is not None and job.message.to != to:
            job.message = dataclasses.replace(job.message, to=to)
        return None

    def _settle_ambiguous(self, rows: list[dict], buffer: list[_Outcome]) -> list[dict]:
        """Rows about to be resent after an ambiguous failure: settle those the provider has a record of."""
        if self.records is None:
            return rows
        ids = [r["message_id"] for r in rows if r["reason_code"] == Decision.AMBIGUOUS_RETRY.value]
        if not ids:
            return rows
        try:
            found = dict(self.records.lookup(ids))
        except Exception:
            # Transactional policy is "no loss over no duplicate": without an answer, resend.
            log.warning("provider records unavailable; resending %d message(s) after ambiguous failures", len(ids),
                        exc_info=True)
            return rows
        keep = []
        for r in rows:
            if r["message_id"] not in found:
                keep.append(r)
                continue
            job = _Job(r, None, r["channel"], tuple(c for c in r["fallback_channels"].split(",") if c), {})
            buffer.append(_outcome_for(r, self._values(
                job, state=OutboxState.SENT, code=Decision.RECONCILED, sent_at=self.clock(),
                provider_message_id=found[r["message_id"]] or None,
                reason=f"sent via {r['channel']}: the provider has a record of it after an ambiguous failure; "
                       "not resent"), kind="reconciled"))
        return keep

    def _prepare(self, job: _Job, chain: list[str], now: datetime, policy: PolicySettings) -> _Outcome | None:
        """Pre-send checks. Returns an outcome when the row must not be sent now, else fills ``job.message``."""
        row = job.row
        if job.ctx is None:
            return self._settle(job, OutboxState.SKIPPED, Decision.NO_REACHABLE_CHANNEL, "member no longer exists")
        rt = route(job.ctx, chain, row["purpose"])
        if not rt.chain:
            return self._settle(job, rt.state, rt.code, f"checked before sending: {rt.reason}")
        if rt.chain[0] != job.channel:
            dropped = "; ".join(f"{r.channel}: {r.detail}" for r in rt.rejected if r.channel == job.channel)
            note = f"{job.channel} unusable before sending ({dropped}); using {rt.chain[0]}"
            job.channel, job.chain_rest = rt.chain[0], rt.chain[1:]
            job.row = {**row, "reason": f"{row['reason']}; {note}"[:500]}
        else:
            job.chain_rest = rt.chain[1:]
        until = quiet_hours_until(now, job.channel, row["purpose"], member_zone(job.ctx.timezone,
                                                                                 policy.fallback_timezone), policy)
        if until is not None:
            return _outcome_for(row, self._values(job, state=OutboxState.DEFERRED, code=Decision.QUIET_HOURS,
                                                    reason=row["reason"], next_attempt_at=until,
                                                    last_error=f"quiet hours: deferred to {until.isoformat()}"),
                            kind="quiet_hours")
        content = job.contents.get(job.channel)
        if content is None:
            return self._settle(job, OutboxState.FAILED, Decision.PERMANENT_FAILURE,
                                f"no rendered content for {job.channel} in the ledger")
        if job.channel not in self.adapters:
            raise ConfigurationError(f"no adapter configured for channel {job.channel}")
        job.message = OutboundMessage(
            message_id=row["message_id"], idempotency_key=row["idempotency_key"], channel=Channel(job.channel),
            purpose=Purpose(row["purpose"]), to=job.ctx.address(job.channel) or "", content=content,
            campaign=row["campaign"], categories=(row["campaign"],),
        )
        return None

    # ----------------------------------------------------------------------------------------------- send

    def _send(self, job: _Job) -> SendResult | None:
        """Pass the gate, then call the provider at the channel's rate.

        The token is taken *before* the gate so that the threads enter it at the channel's rate. But a
        gate transaction that waits on a busy database holds every thread that arrived meanwhile, and
        they would leave it together: a burst of ``rate x stall`` requests at the provider. So a second
        bucket with the same rate paces the calls themselves after the gate; a call that had to wait
        there longer than ``gate_slack`` passes the gate again first, so that consent, suppression and
        pause are still read right before the request.
        """
        self.limiters[job.channel].acquire()
        if not self._gated(job):
            return None
        pacer = self.pacers.get(job.channel)
        if pacer is not None:
            wait = pacer.reserve()
            if wait > 0:
                self.sleep(wait)
            if wait > self.config.gate_slack and not self._gated(job):
                return None
        assert job.message is not None  # built when the job was claimed
        return self.adapters[job.channel].send(job.message)

    def _gated(self, job: _Job) -> bool:
        """True when ``job`` passed the send gate; otherwise ``job.gated`` holds what became of it."""
        try:
            verdict = self._gate.submit(job)
        except Exception as exc:  # noqa: BLE001 - the database is unreachable beyond the retries: not attempted
            why = f"the send gate could not be checked ({type(exc).__name__})"
            log.error("run %s: %s; stopping", self._run_id, why)
            self._gate_stop = self._gate_stop or why
            job.gated = self._release(job, f"not sent: {why}")
            return False
        if verdict is not GO:
            job.gated = verdict
            return False
        return True

    # ------------------------------------------------------------------------------------------- outcomes

    def _values(self, job: _Job, *, state: OutboxState, code: Decision, reason: str, attempted: bool = False,
                next_attempt_at: datetime | None = None, **extra) -> dict[str, Any]:
        row = job.row
        values = dict(state=state.value, reason_code=code.value, reason=reason[:500], channel=job.channel,
                      fallback_channels=",".join(job.chain_rest), next_attempt_at=next_attempt_at,
                      attempts=row["attempts"] + (1 if attempted else 0),
                      transient_failures=row["transient_failures"], claimed_by=None, claimed_at=None,
                      updated_at=self.clock(), last_error=None, provider_message_id=None, sent_at=None,
                      attempt_started_at=None)
        values.update(extra)
        return values

    def _settle(self, job: _Job, state: OutboxState, code: Decision, reason: str) -> _Outcome:
        return _outcome_for(job.row, self._values(job, state=state, code=code, reason=reason), kind=state.value)

    def _release(self, job: _Job, why: str) -> _Outcome:
        """Back to planned, untouched: the provider was never called for it in this attempt."""
        row = job.row
        return _outcome_for(row, dict(
            state=OutboxState.PLANNED.value, reason_code=Decision.ROUTED.value, reason=row["reason"],
            channel=row["channel"], fallback_channels=row["fallback_channels"], next_attempt_at=None,
            attempts=row["attempts"], transient_failures=row["transient_failures"], claimed_by=None,
            claimed_at=None, updated_at=self.clock(), last_error=why, provider_message_id=None, sent_at=None,
            attempt_started_at=None), kind="released")

    def _outcome(self, job: _Job, result: SendResult | BaseException, policy: PolicySettings) -> _Outcome:
        row, now = job.row, self.clock()
        ch = job.channel
        if isinstance(result, Accepted):
            why = row["reason"]
            why = f"sent {why}" if why.startswith(f"via {ch}") else f"sent via {ch}; {why}"
            return _outcome_for(row, self._values(
                job, state=OutboxState.SENT, code=Decision.SENT, attempted=True, sent_at=now,
                provider_message_id=result.provider_message_id, reason=why), budget=False, kind="sent")
        if isinstance(result, TransientFailure):
            if result.throttled:
                wait_s = result.retry_after if result.retry_after is not None else self.config.backoff_base
                self.limiters[ch].pause(wait_s)
                if ch in self.pacers:
                    self.pacers[ch].pause(wait_s)
                return _outcome_for(row, self._values(
                    job, state=OutboxState.DEFERRED, code=Decision.THROTTLED, attempted=True, reason=row["reason"],
                    next_attempt_at=now + timedelta(seconds=wait_s),
                    last_error=f"throttled by the {ch} provider (retry after {wait_s:g}s): {result.reason}"),
                    budget=None, kind="throttled")
            if result.ambiguous:
                return self._ambiguous(job, result, row["transient_failures"] + 1, now)
            failures = row["transient_failures"] + 1
            if failures >= self.config.max_transient_failures:
                return _outcome_for(row, self._values(
                    job, state=OutboxState.FAILED, code=Decision.RETRIES_EXHAUSTED, attempted=True,
                    reason=f"{ch}: gave up after {failures} transient failures", transient_failures=failures,
                    last_error=result.reason[:500]), budget=True, kind="failed")
            delay = self._backoff(failures, result.retry_after)
            return _outcome_for(row, self._values(
                job, state=OutboxState.DEFERRED, code=Decision.RETRY, attempted=True, transient_failures=failures,
                reason=row["reason"], next_attempt_at=now + timedelta(seconds=delay),
                last_error=f"{ch}: transient failure #{failures}, retrying in {delay:.1f}s: {result.reason}"),
                budget=True, kind="retry")
        if isinstance(result, PermanentFailure):
            effect = self._learn(job, result)
            # Recipient-level failures (a dead token, a wrong number, an opt-out) are data attrition, not a
            # sign that the run is broken; content or account rejections are.
            counted = True if result.reason in (FailureReason.REJECTED, FailureReason.BLOCKED) else None
            detail = f"{ch} failed permanently ({result.reason.value}{': ' + result.detail if result.detail else ''})"
            if result.fallback and job.chain_rest and job.ctx is not None:
                rt = route(job.ctx, list(job.chain_rest), row["purpose"])
                if rt.chain and rt.chain[0] in job.contents:
                    nxt = rt.chain[0]
                    job.channel, job.chain_rest = nxt, rt.chain[1:]
                    return _outcome_for(row, self._values(
                        job, state=OutboxState.PLANNED, code=Decision.FALLBACK, attempted=True,
                        reason=f"via {nxt}: fallback because {detail}", last_error=detail),
                        budget=counted, kind="fallback", side_effect=effect)
            if not job.chain_rest:
                why = f"{detail}; no other channel left"
            elif not result.fallback:
                why = f"{detail}; this failure does not allow a fallback"
            else:
                why = f"{detail}; no fallback channel usable any more"
            return _outcome_for(row, self._values(
                job, state=OutboxState.FAILED, code=Decision.PERMANENT_FAILURE, attempted=True, reason=why,
                last_error=detail), budget=counted, kind="failed", side_effect=effect)
        # An exception from the adapter: the request may have reached the provider. Never resent blindly.
        return _outcome_for(row, self._values(
            job, state=OutboxState.UNKNOWN, code=Decision.ADAPTER_ERROR, attempted=True,
            reason=f"{ch} adapter raised {type(result).__name__}; outcome unknown, will be reconciled",
            last_error=str(result)[:500]), budget=True, kind="unknown")

    def _ambiguous(self, job: _Job, result: TransientFailure, failures: int, now: datetime) -> _Outcome:
        """The provider may have accepted the message. Marketing: no duplicate over no loss, so the row
        becomes ``unknown`` and reconciliation settles it by our message id. Transactional: no loss over no
        duplicate, so it is retried after ``ambiguous_retry_delay`` (provider records and events get to
        settle it first); when retries are exhausted it is ``unknown`` too, never ``failed``."""
        row, ch = job.row, job.channel
        what = f"{ch}: {result.reason}; the provider may have accepted it"
        if row["purpose"] == Purpose.TRANSACTIONAL and failures < self.config.max_transient_failures:
            delay = max(self._backoff(failures, result.retry_after), self.config.ambiguous_retry_delay)
            return _outcome_for(row, self._values(
                job, state=OutboxState.DEFERRED, code=Decision.AMBIGUOUS_RETRY, attempted=True,
                transient_failures=failures, reason=row["reason"], next_attempt_at=now + timedelta(seconds=delay),
                last_error=f"{what}; transactional: resending in {delay:.0f}s unless the provider has a record of it"),
                budget=True, kind="ambiguous_retry")
        policy = ("marketing: not resent (no duplicate over no loss)" if row["purpose"] != Purpose.TRANSACTIONAL
                  else f"transactional: gave up resending after {failures} failures")
        return _outcome_for(row, self._values(
            job, state=OutboxState.UNKNOWN, code=Decision.AMBIGUOUS, attempted=True, transient_failures=failures,
            reason=f"outcome unknown after an ambiguous failure ({what}); {policy}; settled by reconciliation "
                   "against provider records and events",
            last_error=result.reason[:500]), budget=True, kind="unknown")

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** (failures - 1)))
        with self._rng_lock:
            delay = self.rng.uniform(0, cap)  # "full jitter": spreads retries of a failed burst
        return max(delay, retry_after or 0.0)

    def _learn(self, job: _Job, result: PermanentFailure) -> Callable[[Connection], None] | None:
        """What a permanent failure teaches us about the address, applied with the outcome."""
        addr = job.message.to if job.message else None
        if not addr:
            return None
        ch, now = job.channel, self.clock()
        if result.reason == FailureReason.UNREGISTERED_TOKEN and ch == Channel.PUSH:
            d = Device.__table__

            def invalidate(conn: Connection) -> None:
                conn.execute(sa.update(d).where(d.c.token == addr, d.c.invalidated_at.is_(None))
                             .values(invalidated_at=now, invalid_reason="unregistered"))
            return invalidate
        reason = {FailureReason.INVALID_RECIPIENT: SuppressionReason.INVALID,
                  FailureReason.OPTED_OUT: SuppressionReason.UNSUBSCRIBE}.get(result.reason)
        if reason is None:
            return None
        h = address_hash(ch, addr)

        def suppress(conn: Connection) -> None:
            s = Suppression.__table__
            conn.execute(insert_for(conn, s).on_conflict_do_nothing(index_elements=["channel", "address_hash"]),
                         dict(channel=ch, address_hash=h, member_id=None, reason=reason.value,
                              source=f"dispatch:{ch}", created_at=now))
        log.info("suppressing %s address %s after %s", ch, redact(addr), result.reason.value)
        return suppress

    def _flush(self, outcomes: list[_Outcome], rep: DispatchReport) -> None:
        o = OutboxMessage.__table__
        # Group by the set of columns so each group is one executemany.
        groups: dict[tuple[str, ...], list[dict]] = {}
        # Rows in id order: fewer deadlocks with the receiver settling rows (see in_transaction below).
        for out in sorted(outcomes, key=lambda out: out.id):
            groups.setdefault(tuple(sorted(out.values)), []).append({"_id": out.id, "_claim": out.claim, **out.values})

        def write(conn: Connection) -> tuple[int, int]:
            # Side effects first (a suppression moves the send gate's version, which locks delivery_controls):
            # every writer then takes that lock before outbox rows, the order the gate and the receiver use.
            for out in outcomes:
                if out.side_effect is not None:
                    out.side_effect(conn)
            changed = 0
            for cols, params in groups.items():
                stmt = (sa.update(o).where(o.c.id == sa.bindparam("_id"), o.c.state == OutboxState.SENDING.value,
                                           o.c.claimed_by == sa.bindparam("_claim"))
                        .values({c: sa.bindparam(c) for c in cols}))
                res = conn.execute(stmt, params)
                changed += res.rowcount if res.rowcount and res.rowcount > 0 else 0
            settled = 0
            if changed < len(outcomes):
                # Rows we no longer hold. A provider event that arrived before our own answer was recorded
                # settles the row as sent (reconcile.mark_sent_from_event): expected, and correct. Only
                # the rest (recovered as unknown by another dispatcher) point at a lease that is too short.
                settled = conn.execute(
                    sa.select(sa.func.count()).select_from(o).where(
                        # (rows we reconciled ourselves are ours, and already counted in ``changed``)
                        o.c.id.in_([out.id for out in outcomes
                                    if out.values.get("reason_code") != Decision.RECONCILED.value]),
                        o.c.state == OutboxState.SENT.value,
                        o.c.reason_code == Decision.RECONCILED.value)
                ).scalar_one()
            return changed, settled

        # A deadlock victim is run again: every statement here is conditional on the row's state (or ON
        # CONFLICT DO NOTHING), so a rerun of a rolled-back try is harmless.
        changed, settled = in_transaction(self.engine, write)
        self._held.difference_update(out.id for out in outcomes)
        for out in outcomes:
            rep.outcomes[out.kind] += 1
        if settled:
            log.debug("%d of %d outcomes were already settled as sent by provider events", settled, len(outcomes))
        lost = len(outcomes) - changed - settled
        if lost > 0:
            log.warning("%d of %d outcomes were not recorded: their rows were recovered as unknown meanwhile "
                        "(lease too short?)", lost, len(outcomes))
