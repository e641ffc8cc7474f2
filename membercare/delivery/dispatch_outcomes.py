"""What becomes of a claimed row: the ledger update for every provider answer, and how it is recorded.

* **Outcomes**: ``Accepted`` -> sent. ``TransientFailure`` -> deferred with exponential backoff and full
  jitter, never earlier than ``Retry-After``; throttling (429) pauses the channel's bucket, does not
  count as a failure of the message and does not use up its retries. An *ambiguous* ``TransientFailure``
  (the provider may have accepted it) -> ``unknown`` for marketing (never resent; reconciliation settles
  it), deferred by at least ``ambiguous_retry_delay`` for transactional, and looked up in ``records``
  before the resend (see :meth:`Outcomes.ambiguous`). ``PermanentFailure`` -> the next
  channel of the fallback chain (content was rendered at planning) when ``fallback`` is allowed, else
  failed; an unregistered token is invalidated in ``devices``, an invalid or opted-out address is added
  to the suppression list.
* **Recording** (:func:`record_outcomes`): results are written in small batches (every ``flush_every``
  results or ``flush_interval`` seconds), guarded by ``state = 'sending' AND claimed_by = <this claim>``.
  Every claim has its own token (``<worker id>/<claim number>``): a row that recovery took back and this
  same dispatcher claimed again is then never sent or recorded through its older claim.
* **Error budget** (:class:`ErrorBudget`): when more than ``run.error_budget`` of the last
  ``error_window`` provider answers were failures, the run is paused; remaining claimed rows go back to
  planned. Counted as failures: transient failures other than throttling, permanent rejections of
  content or account (``rejected``, ``blocked``) and adapter exceptions. Not counted: throttling, and
  recipient-level permanent failures (invalid recipient, opted out, unregistered token), which are list
  attrition, not a broken run.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction, insert_for
from membercare.delivery.contract import (
    Accepted,
    FailureReason,
    PermanentFailure,
    SendResult,
    TransientFailure,
    redact,
)
from membercare.delivery.dispatch_types import DispatchConfig, DispatchReport, Job, Outcome, outcome_for
from membercare.delivery.models import (
    Decision,
    OutboxMessage,
    OutboxState,
    Suppression,
    SuppressionReason,
    address_hash,
)
from membercare.delivery.ratelimit import TokenBucket, Unlimited
from membercare.delivery.routing import route
from membercare.models import Channel, Device, Purpose

# One logger for all the dispatcher's parts: operators and tests select dispatch logs by this name.
log = logging.getLogger("membercare.delivery.dispatcher")


class ErrorBudget:
    """Sliding window over the last ``window`` provider answers; throttling is never recorded here."""

    def __init__(self, budget: float, window: int, min_samples: int):
        self.budget, self.min_samples = budget, min_samples
        self._window: deque[bool] = deque(maxlen=window)
        self._channels: deque[str | None] = deque(maxlen=window)  # the failing channel of each answer

    def record(self, failed: bool, channel: str | None = None) -> None:
        self._window.append(failed)
        self._channels.append(channel if failed else None)

    def failures_by_channel(self) -> dict[str, int]:
        """Failures in the window per channel: which provider spent the budget."""
        out: dict[str, int] = {}
        for ch in self._channels:
            if ch is not None:
                out[ch] = out.get(ch, 0) + 1
        return out

    @property
    def samples(self) -> int:
        return len(self._window)

    @property
    def failure_rate(self) -> float:
        return sum(self._window) / len(self._window) if self._window else 0.0

    def spent(self) -> bool:
        return len(self._window) >= self.min_samples and self.failure_rate > self.budget


class Outcomes:
    """Builds the :class:`Outcome` of a job: the row's new values, whether the error budget counts it, and
    what a permanent failure teaches about the address. Throttling pauses the channel's ``limiters`` and
    ``pacers`` (the dispatcher's own dicts, shared, so that replacing a limiter there is seen here)."""

    def __init__(self, config: DispatchConfig, clock: Callable[[], datetime], rng: random.Random,
                 limiters: Mapping[str, TokenBucket | Unlimited], pacers: Mapping[str, TokenBucket]):
        self.config, self.clock, self.rng = config, clock, rng
        self.limiters, self.pacers = limiters, pacers
        self._rng_lock = threading.Lock()

    def values(self, job: Job, *, state: OutboxState, code: Decision, reason: str, attempted: bool = False,
               next_attempt_at: datetime | None = None, **extra: Any) -> dict[str, Any]:
        row = job.row
        values = dict(state=state.value, reason_code=code.value, reason=reason[:500], channel=job.channel,
                      fallback_channels=",".join(job.chain_rest), next_attempt_at=next_attempt_at,
                      attempts=row["attempts"] + (1 if attempted else 0),
                      transient_failures=row["transient_failures"], claimed_by=None, claimed_at=None,
                      updated_at=self.clock(), last_error=None, provider_message_id=None, sent_at=None,
                      attempt_started_at=None)
        values.update(extra)
        return values

    def settle(self, job: Job, state: OutboxState, code: Decision, reason: str) -> Outcome:
        return outcome_for(job.row, self.values(job, state=state, code=code, reason=reason), kind=state.value)

    def release(self, job: Job, why: str) -> Outcome:
        """Back to planned, untouched: the provider was never called for it in this attempt."""
        row = job.row
        return outcome_for(row, dict(
            state=OutboxState.PLANNED.value, reason_code=Decision.ROUTED.value, reason=row["reason"],
            channel=row["channel"], fallback_channels=row["fallback_channels"], next_attempt_at=None,
            attempts=row["attempts"], transient_failures=row["transient_failures"], claimed_by=None,
            claimed_at=None, updated_at=self.clock(), last_error=why, provider_message_id=None, sent_at=None,
            attempt_started_at=None), kind="released")

    def outcome(self, job: Job, result: SendResult | BaseException) -> Outcome:
        """The outcome of a provider call: its answer, or the exception the adapter raised."""
        row, now = job.row, self.clock()
        ch = job.channel
        if isinstance(result, Accepted):
            why = row["reason"]
            why = f"sent {why}" if why.startswith(f"via {ch}") else f"sent via {ch}; {why}"
            return outcome_for(row, self.values(
                job, state=OutboxState.SENT, code=Decision.SENT, attempted=True, sent_at=now,
                provider_message_id=result.provider_message_id, reason=why), budget=False, kind="sent")
        if isinstance(result, TransientFailure):
            return self._transient(job, result, now)
        if isinstance(result, PermanentFailure):
            return self._permanent(job, result)
        # An exception from the adapter: the request may have reached the provider. Never resent blindly.
        return outcome_for(row, self.values(
            job, state=OutboxState.UNKNOWN, code=Decision.ADAPTER_ERROR, attempted=True,
            reason=f"{ch} adapter raised {type(result).__name__}; outcome unknown, will be reconciled",
            last_error=str(result)[:500]), budget=True, kind="unknown")

    def _transient(self, job: Job, result: TransientFailure, now: datetime) -> Outcome:
        row, ch = job.row, job.channel
        if result.throttled:
            wait_s = result.retry_after if result.retry_after is not None else self.config.backoff_base
            self.limiters[ch].pause(wait_s)
            if ch in self.pacers:
                self.pacers[ch].pause(wait_s)
            return outcome_for(row, self.values(
                job, state=OutboxState.DEFERRED, code=Decision.THROTTLED, attempted=True, reason=row["reason"],
                next_attempt_at=now + timedelta(seconds=wait_s),
                last_error=f"throttled by the {ch} provider (retry after {wait_s:g}s): {result.reason}"),
                budget=None, kind="throttled")
        if result.ambiguous:
            return self.ambiguous(job, result, row["transient_failures"] + 1, now)
        failures = row["transient_failures"] + 1
        if failures >= self.config.max_transient_failures:
            return outcome_for(row, self.values(
                job, state=OutboxState.FAILED, code=Decision.RETRIES_EXHAUSTED, attempted=True,
                reason=f"{ch}: gave up after {failures} transient failures", transient_failures=failures,
                last_error=result.reason[:500]), budget=True, kind="failed")
        delay = self.backoff(failures, result.retry_after)
        return outcome_for(row, self.values(
            job, state=OutboxState.DEFERRED, code=Decision.RETRY, attempted=True, transient_failures=failures,
            reason=row["reason"], next_attempt_at=now + timedelta(seconds=delay),
            last_error=f"{ch}: transient failure #{failures}, retrying in {delay:.1f}s: {result.reason}"),
            budget=True, kind="retry")

    def _permanent(self, job: Job, result: PermanentFailure) -> Outcome:
        row, ch = job.row, job.channel
        effect = self.learn(job, result)
        # Recipient-level failures (a dead token, a wrong number, an opt-out) are data attrition, not a
        # sign that the run is broken; content or account rejections are.
        counted = True if result.reason in (FailureReason.REJECTED, FailureReason.BLOCKED) else None
        detail = f"{ch} failed permanently ({result.reason.value}{': ' + result.detail if result.detail else ''})"
        if result.fallback and job.chain_rest and job.ctx is not None:
            rt = route(job.ctx, list(job.chain_rest), row["purpose"])
            if rt.chain and rt.chain[0] in job.contents:
                nxt = rt.chain[0]
                job.channel, job.chain_rest = nxt, rt.chain[1:]
                return outcome_for(row, self.values(
                    job, state=OutboxState.PLANNED, code=Decision.FALLBACK, attempted=True,
                    reason=f"via {nxt}: fallback because {detail}", last_error=detail),
                    budget=counted, kind="fallback", side_effect=effect)
        if not job.chain_rest:
            why = f"{detail}; no other channel left"
        elif not result.fallback:
            why = f"{detail}; this failure does not allow a fallback"
        else:
            why = f"{detail}; no fallback channel usable any more"
        return outcome_for(row, self.values(
            job, state=OutboxState.FAILED, code=Decision.PERMANENT_FAILURE, attempted=True, reason=why,
            last_error=detail), budget=counted, kind="failed", side_effect=effect)

    def ambiguous(self, job: Job, result: TransientFailure, failures: int, now: datetime) -> Outcome:
        """The provider may have accepted the message. Marketing: no duplicate over no loss, so the row
        becomes ``unknown`` and reconciliation settles it by our message id. Transactional: no loss over no
        duplicate, so it is retried after ``ambiguous_retry_delay`` (provider records and events get to
        settle it first); when retries are exhausted it is ``unknown`` too, never ``failed``."""
        row, ch = job.row, job.channel
        what = f"{ch}: {result.reason}; the provider may have accepted it"
        if row["purpose"] == Purpose.TRANSACTIONAL and failures < self.config.max_transient_failures:
            delay = max(self.backoff(failures, result.retry_after), self.config.ambiguous_retry_delay)
            return outcome_for(row, self.values(
                job, state=OutboxState.DEFERRED, code=Decision.AMBIGUOUS_RETRY, attempted=True,
                transient_failures=failures, reason=row["reason"], next_attempt_at=now + timedelta(seconds=delay),
                last_error=f"{what}; transactional: resending in {delay:.0f}s unless the provider has a record of it"),
                budget=True, kind="ambiguous_retry")
        policy = ("marketing: not resent (no duplicate over no loss)" if row["purpose"] != Purpose.TRANSACTIONAL
                  else f"transactional: gave up resending after {failures} failures")
        return outcome_for(row, self.values(
            job, state=OutboxState.UNKNOWN, code=Decision.AMBIGUOUS, attempted=True, transient_failures=failures,
            reason=f"outcome unknown after an ambiguous failure ({what}); {policy}; settled by reconciliation "
                   "against provider records and events",
            last_error=result.reason[:500]), budget=True, kind="unknown")

    def backoff(self, failures: int, retry_after: float | None) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** (failures - 1)))
        with self._rng_lock:
            delay = self.rng.uniform(0, cap)  # "full jitter": spreads retries of a failed burst
        return max(delay, retry_after or 0.0)

    def learn(self, job: Job, result: PermanentFailure) -> Callable[[Connection], None] | None:
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


_UPDATES: dict[tuple[str, ...], sa.Update] = {}


def _guarded_update(cols: tuple[str, ...]) -> sa.Update:
    """``UPDATE outbox SET <cols> WHERE id = :_id AND state = 'sending' AND claimed_by = :_claim``, built once per
    set of columns (a few kinds of outcome): a reused statement skips construction and cache-key generation."""
    stmt = _UPDATES.get(cols)
    if stmt is None:
        o = OutboxMessage.__table__
        stmt = (sa.update(o).where(o.c.id == sa.bindparam("_id"), o.c.state == OutboxState.SENDING.value,
                                   o.c.claimed_by == sa.bindparam("_claim"))
                .values({c: sa.bindparam(c) for c in cols}))
        _UPDATES[cols] = stmt  # a racing thread may build it too: either copy is the same statement
    return stmt


def record_outcomes(engine: Engine, outcomes: list[Outcome], rep: DispatchReport) -> None:
    """Write buffered outcomes in one transaction, each guarded by its row's state and claim token."""
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
            res = conn.execute(_guarded_update(cols), params)
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
    changed, settled = in_transaction(engine, write)
    for out in outcomes:
        rep.outcomes[out.kind] += 1
    if settled:
        log.debug("%d of %d outcomes were already settled as sent by provider events", settled, len(outcomes))
    lost = len(outcomes) - changed - settled
    if lost > 0:
        log.warning("%d of %d outcomes were not recorded: their rows were recovered as unknown meanwhile "
                    "(lease too short?)", lost, len(outcomes))
