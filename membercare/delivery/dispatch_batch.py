"""Batch requests: one provider request for many claimed rows that carry the same content (LINE multicast).

Used only for adapters with the optional :class:`~membercare.delivery.contract.BatchSender` capability.
The dispatcher's other parts stay per row; this module adds three steps around them:

* **Grouping** (:func:`group_batches`, after a claim): rows of the claimed batch (one run, so one campaign
  occurrence) on a batch-capable channel whose rendered content is byte-identical (nothing personal: no
  name, no per-message link or postback id) are put into :class:`BatchJob` s of at most
  ``adapter.max_batch`` rows; a group of one stays an ordinary job. Rows resent after an ambiguous failure
  of their own request (``ambiguous_retry``) keep being sent alone, with the idempotency key that request
  had.
* **Sending** (:func:`send_batch`, in a worker thread): one rate-limit token and one pacer slot for the
  request (providers such as LINE count requests, not recipients); every member passes the send gate
  (consent, suppression, pause, kill switch) in one gate transaction right before the request, and a
  member the gate stops is left out of it. Then the batch key (:func:`batch_key`, a hash of the members'
  outbox keys: the same rows always give the same key) is written to each member's
  ``provider_message_id``, and only then is the request made: a crash after it leaves ``unknown`` rows that
  name their batch, so reconciliation can repeat exactly that request with the same idempotency key
  (:mod:`membercare.delivery.retry_key_records`). When the provider refused the whole request because of
  one recipient it does not name, the members are sent one by one (each passes the gate again).
* **Outcomes** (:func:`finish_batch`, in the dispatching thread): one outcome per member, as for single
  sends, except that an ambiguous answer or an adapter exception leaves every member ``unknown`` *with*
  its batch key (marketing and transactional alike: the provider's idempotency settles them exactly,
  where a per-row resend would carry another key and could deliver twice).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.contract import Accepted, BatchSender, ChannelAdapter, PermanentFailure, TransientFailure
from membercare.delivery.dispatch_outcomes import ErrorBudget, Outcomes
from membercare.delivery.dispatch_types import DROP, GO, DispatchReport, Job, Outcome, outcome_for
from membercare.delivery.models import Decision, OutboxMessage, OutboxState
from membercare.errors import ConfigurationError

if TYPE_CHECKING:
    from membercare.delivery.dispatch_send import GatedSender

log = logging.getLogger("membercare.delivery.dispatcher")

# ``provider_message_id`` of a row whose batch request may have been made: ``batch:<sha-256 of the outbox keys>``.
BATCH_KEY_PREFIX = "batch:"


@dataclass(eq=False)
class BatchJob(Job):
    """Several claimed rows sent as one request. The pool runs it like a job; the results are on ``members``."""

    members: list[Job] = field(default_factory=list)
    key: str | None = None  # the batch key the request was made with
    alone: set[int] = field(default_factory=set)  # row ids sent one by one after the request was refused


def members_of(job: Job) -> list[Job]:
    """The rows a job stands for: the members of a batch, else the job itself."""
    return job.members if isinstance(job, BatchJob) else [job]


class InFlight:
    """The dispatcher's jobs in flight, and how many rows they stand for (kept as a count: the loop asks
    for it on every turn, and summing over the set made that cost grow with the number in flight)."""

    __slots__ = ("_jobs", "rows")

    def __init__(self) -> None:
        self._jobs: set[Job] = set()
        self.rows = 0

    def add(self, job: Job) -> None:
        if job not in self._jobs:
            self._jobs.add(job)
            self.rows += len(job.members) if isinstance(job, BatchJob) else 1

    def discard(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
            self.rows -= len(job.members) if isinstance(job, BatchJob) else 1

    def __contains__(self, job: object) -> bool:
        return job in self._jobs

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)


def batch_key(jobs: Sequence[Job]) -> str:
    """The key of exactly this set of rows (order does not matter), from their outbox idempotency keys."""
    digest = hashlib.sha256("\n".join(sorted(j.row["idempotency_key"] for j in jobs)).encode()).hexdigest()
    return BATCH_KEY_PREFIX + digest


def group_batches(jobs: list[Job], adapters: Mapping[str, ChannelAdapter]) -> list[Job]:
    """``jobs`` with the rows that can share a request put into :class:`BatchJob` s (see the module docstring)."""
    out: list[Job] = []
    groups: dict[tuple[str, str, str, str], list[Job]] = {}
    # BatchSender is a runtime-checkable protocol: isinstance inspects its attributes, so ask once per adapter.
    batching = {ch: isinstance(a, BatchSender) for ch, a in adapters.items()}
    for job in jobs:
        if (job.message is None or not batching.get(job.channel, False)
                or job.row["reason_code"] == Decision.AMBIGUOUS_RETRY.value):
            out.append(job)
            continue
        # repr of the frozen content dataclass: equal exactly when every field is the same string.
        key = (job.channel, job.row["purpose"], job.row["campaign"], repr(job.message.content))
        groups.setdefault(key, []).append(job)
    for (channel, *_), group in groups.items():
        if len(group) == 1:
            out.extend(group)
            continue
        size = max(1, int(adapters[channel].max_batch))  # type: ignore[attr-defined]
        for i in range(0, len(group), size):
            chunk = group[i:i + size]
            if len(chunk) == 1:
                out.extend(chunk)
            else:
                out.append(BatchJob(chunk[0].row, None, channel, (), {}, members=chunk))
    return out


def send_batch(sender: GatedSender, batch: BatchJob) -> None:
    """The worker thread's part: rate token, send gate for every member, pacing, batch key, one request."""
    channel = batch.channel
    sender.limiters[channel].acquire()
    go = _gate(sender, batch.members)
    pacer = sender.pacers.get(channel)
    if go and pacer is not None:
        wait = pacer.reserve()
        if wait > 0:
            sender.sleep(wait)
        if wait > sender.config.gate_slack:
            go = _gate(sender, go)
    if not go:
        return
    try:
        go = _write_key(sender.engine, go, batch)
    except Exception as exc:  # noqa: BLE001 - the database is unreachable beyond the retries: not attempted
        _not_attempted(sender, go, f"the batch key could not be recorded ({type(exc).__name__})")
        return
    if not go:
        return
    adapter: BatchSender = sender.adapters[channel]  # type: ignore[assignment]
    try:
        results = adapter.send_many([j.message for j in go if j.message is not None], batch.key or "")
    except Exception as exc:  # noqa: BLE001 - handed to the dispatching thread, per member
        for j in go:
            j.error = exc
        return
    for j, result in zip(go, results, strict=True):
        j.result = result
    alone = [j for j in go if j.result is None]
    if alone:
        # Nothing was sent: clear the batch key first, so that a crash during the single sends is reconciled
        # with each row's own key, never by repeating the batch request.
        try:
            alone = _write_key(sender.engine, alone, None)
        except Exception as exc:  # noqa: BLE001 - nothing was sent to them: released
            _not_attempted(sender, alone, f"the batch key could not be cleared ({type(exc).__name__})")
            return
        for j in alone:
            batch.alone.add(j.row["id"])
            try:
                j.result = sender.send(j)
            except Exception as exc:  # noqa: BLE001 - handed to the dispatching thread
                j.error = exc


def finish_batch(batch: BatchJob, outcomes: Outcomes, budget: ErrorBudget | None, rep: DispatchReport | None,
                 buffer: list[Outcome], take_gated: Callable[[Job, list[Outcome]], None]) -> ConfigurationError | None:
    """Buffer one outcome per member of a finished batch; returns the configuration error it met, if any.
    An interrupt raised in the worker (``KeyboardInterrupt``, ``SystemExit``) is raised again here."""
    if batch.error is not None:
        raise batch.error  # the pool only leaves BaseExceptions on the batch itself
    config_error: ConfigurationError | None = None
    for j in batch.members:
        if j.gated is not None:
            take_gated(j, buffer)
            continue
        if isinstance(j.error, ConfigurationError):
            buffer.append(outcomes.release(j, "not sent: configuration error"))
            config_error = config_error or j.error
            continue
        if j.error is None and j.result is None:  # never part of a request (a single send the gate stopped)
            buffer.append(outcomes.release(j, "not sent: dispatch stopped"))
            continue
        result = j.error if j.error is not None else j.result
        if isinstance(j.error, Exception):
            log.error("adapter %s raised for a batch of %d (message %s)", j.channel, len(batch.members),
                      j.row["message_id"], exc_info=j.error)
        if rep is not None:
            rep.attempts += 1
        settled = (j.row["id"] in batch.alone or isinstance(result, (Accepted, PermanentFailure))
                   or (isinstance(result, TransientFailure) and not result.ambiguous))
        out = outcomes.outcome(j, result) if settled else _unknown(outcomes, j, result, batch)
        if budget is not None and out.budget is not None:
            budget.record(out.budget, j.channel)
        buffer.append(out)
    return config_error


def _unknown(outcomes: Outcomes, job: Job, result: object, batch: BatchJob) -> Outcome:
    """The batch request may have been accepted: ``unknown``, keeping the batch key for reconciliation."""
    ambiguous = isinstance(result, TransientFailure)
    what = result.reason if isinstance(result, TransientFailure) else f"adapter raised {type(result).__name__}"
    return outcome_for(job.row, outcomes.values(
        job, state=OutboxState.UNKNOWN, code=Decision.AMBIGUOUS if ambiguous else Decision.ADAPTER_ERROR,
        attempted=True, transient_failures=job.row["transient_failures"] + 1, provider_message_id=batch.key,
        reason=f"outcome unknown after the batch request of {len(batch.members)} failed ambiguously "
               f"({job.channel}: {what}); not resent: reconciliation repeats that request with the same "
               "idempotency key",
        last_error=str(what)[:500]), budget=True, kind="unknown")


def _gate(sender: GatedSender, jobs: Sequence[Job]) -> list[Job]:
    """The members that passed the send gate now (one transaction for all); the others get ``gated``."""
    try:
        verdicts = sender.gate_fn(jobs)
    except Exception as exc:  # noqa: BLE001 - as GatedSender.gated: not attempted, the pass stops
        _not_attempted(sender, jobs, f"the send gate could not be checked ({type(exc).__name__})")
        return []
    go = []
    for j in jobs:
        verdict = verdicts.get(j, DROP)
        if verdict is GO:
            go.append(j)
        else:
            j.gated = verdict
    return go


def _not_attempted(sender: GatedSender, jobs: Sequence[Job], why: str) -> None:
    log.error("run %s: %s; stopping", sender.run_id, why)
    sender.stop = sender.stop or why
    for j in jobs:
        j.gated = sender.outcomes.release(j, f"not sent: {why}")


def _write_key(engine: Engine, jobs: list[Job], batch: BatchJob | None) -> list[Job]:
    """Record the batch key on the rows still held under their claim (``None``: clear it); returns those
    rows. A row lost meanwhile (recovered by another dispatcher) is left out, and the key is computed again
    for the rows that remain, so it always names exactly the rows of the request."""
    o = OutboxMessage.__table__
    while jobs:
        key = batch_key(jobs) if batch is not None else None

        def work(conn: Connection, key: str | None = key, jobs: list[Job] = jobs) -> set[int]:
            held: set[int] = set()
            for token in sorted({j.row["claim"] for j in jobs}):
                held.update(conn.execute(
                    sa.update(o).where(o.c.id.in_([j.row["id"] for j in jobs if j.row["claim"] == token]),
                                       o.c.state == OutboxState.SENDING.value, o.c.claimed_by == token)
                    .values(provider_message_id=key).returning(o.c.id)).scalars())
            return held

        held = in_transaction(engine, work)
        lost = [j for j in jobs if j.row["id"] not in held]
        if not lost:
            if batch is not None:
                batch.key = key
            return jobs
        for j in lost:
            j.gated = DROP
        jobs = [j for j in jobs if j.row["id"] in held]
    return []
