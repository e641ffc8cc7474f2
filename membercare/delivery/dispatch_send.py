"""The send gate pass and the pacing of provider calls: what a worker thread does with one job.

* **The send gate** (:mod:`membercare.delivery.gate`), right before each provider call: consent,
  suppression, the run's pause and the global kill switch are checked again (from a versioned view,
  reloaded only when something that can forbid a send changed) and ``attempt_started_at`` is committed.
  A claimed row that never passed the gate was never attempted: after a crash it is sent, not lost.
* **Sending**: each worker thread takes a token from its channel's
  :class:`~membercare.delivery.ratelimit.TokenBucket` before the gate, and a second bucket of the same
  rate paces the provider calls after it (see :meth:`GatedSender.send`), then calls ``adapter.send``, or,
  with the async transport, hands the call to the send loop (``SendPool.handoff`` in dispatch_pool);
  rows that share one request (LINE multicast) are sent by :mod:`membercare.delivery.dispatch_batch`.
* **Database faults**: the gate runs through :func:`membercare.db.in_transaction`, which runs it again from
  the start after a deadlock or a dropped connection (its writes are conditional on the row's state and
  claim, so a rerun is harmless). A gate that cannot be checked at all stops the dispatch pass; the job is
  released, never attempted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.contract import ChannelAdapter, SendResult
from membercare.delivery.dispatch_batch import BatchJob, send_batch
from membercare.delivery.dispatch_claim import load_member_contexts
from membercare.delivery.dispatch_outcomes import Outcomes
from membercare.delivery.dispatch_pool import Pending
from membercare.delivery.dispatch_types import DROP, GO, DispatchConfig, Job, Outcome, outcome_for
from membercare.delivery.gate import GroupCommit, enter_gate
from membercare.delivery.models import Decision, OutboxMessage, OutboxState, RunStatus
from membercare.delivery.policies import PolicySettings
from membercare.delivery.ratelimit import TokenBucket, Unlimited
from membercare.delivery.routing import MemberContext, route

# One logger for all the dispatcher's parts: operators and tests select dispatch logs by this name.
log = logging.getLogger("membercare.delivery.dispatcher")

GateBatch = Callable[[Sequence[Job]], dict[Job, Any]]


class GatedSender:
    """Runs in the send pool's threads: ``send(job)`` passes the gate, waits for its pace, calls the provider.

    The worker threads share the gate through one :class:`~membercare.delivery.gate.GroupCommit`, which
    runs ``gate_batch`` (by default :meth:`gate_batch`) for each group of jobs. ``limiters`` and ``pacers``
    are the dispatcher's own dicts (shared: a limiter replaced there is used here). ``stop`` is set, once,
    when the gate found the run paused or could not be checked; the dispatcher's loop reads it.
    """

    def __init__(self, engine: Engine, adapters: Mapping[str, ChannelAdapter], config: DispatchConfig,
                 outcomes: Outcomes, limiters: Mapping[str, TokenBucket | Unlimited],
                 pacers: Mapping[str, TokenBucket], clock: Callable[[], datetime], sleep: Callable[[float], None],
                 gate_batch: GateBatch | None = None):
        self.engine, self.adapters, self.config, self.outcomes = engine, adapters, config, outcomes
        self.limiters, self.pacers, self.clock, self.sleep = limiters, pacers, clock, sleep
        self.gate_fn: GateBatch = gate_batch or self.gate_batch  # also run directly for a batch's members
        self.gate: GroupCommit[Job, Any] = GroupCommit(self.gate_fn)
        self.run_id: int | None = None
        self.policy: PolicySettings | None = None
        self.stop: str | None = None
        # Set by the dispatcher to its send pool's handoff (the async transport); None: call ``adapter.send``.
        self.handoff: Callable[[Job, ChannelAdapter], SendResult | Pending] | None = None

    def begin(self, run_id: int, policy: PolicySettings) -> None:
        """A dispatch pass over ``run_id`` starts."""
        self.run_id, self.policy, self.stop = run_id, policy, None

    def send(self, job: Job) -> SendResult | Pending | None:
        """Pass the gate, then call the provider at the channel's rate.

        The token is taken *before* the gate so that the threads enter it at the channel's rate. But a
        gate transaction that waits on a busy database holds every thread that arrived meanwhile, and
        they would leave it together: a burst of ``rate x stall`` requests at the provider. So a second
        bucket with the same rate paces the calls themselves after the gate; a call that had to wait
        there longer than ``gate_slack`` passes the gate again first, so that consent, suppression and
        pause are still read right before the request.

        A :class:`~membercare.delivery.dispatch_batch.BatchJob` (rows sharing one request) goes through
        :func:`~membercare.delivery.dispatch_batch.send_batch`, which does the same for the request.
        """
        if isinstance(job, BatchJob):
            send_batch(self, job)
            return None
        self.limiters[job.channel].acquire()
        if not self.gated(job):
            return None
        pacer = self.pacers.get(job.channel)
        if pacer is not None:
            wait = pacer.reserve()
            if wait > 0:
                self.sleep(wait)
            if wait > self.config.gate_slack and not self.gated(job):
                return None
        assert job.message is not None  # built when the job was claimed
        adapter = self.adapters[job.channel]
        if self.handoff is not None:
            return self.handoff(job, adapter)  # a result, or PENDING: the send loop finishes the job
        return adapter.send(job.message)

    def gated(self, job: Job) -> bool:
        """True when ``job`` passed the send gate; otherwise ``job.gated`` holds what became of it."""
        try:
            verdict = self.gate.submit(job)
        except Exception as exc:  # noqa: BLE001 - the database is unreachable beyond the retries: not attempted
            why = f"the send gate could not be checked ({type(exc).__name__})"
            log.error("run %s: %s; stopping", self.run_id, why)
            self.stop = self.stop or why
            job.gated = self.outcomes.release(job, f"not sent: {why}")
            return False
        if verdict is not GO:
            job.gated = verdict
            return False
        return True

    def gate_batch(self, jobs: Sequence[Job]) -> dict[Job, Any]:
        """The send gate for a group of jobs (see :mod:`membercare.delivery.gate`): GO, DROP or an outcome."""
        now = self.clock()
        policy = self.policy or PolicySettings()

        def work(conn: Connection) -> dict[Job, Any]:
            st = enter_gate(conn, self.run_id)
            stop = None
            if st.paused_all:
                stop = f"all sending is paused ({st.paused_reason or 'kill switch'})"
            elif st.run_status != RunStatus.DISPATCHING:
                stop = f"the run is {st.run_status}" + (f" ({st.run_reason})" if st.run_reason else "")
            if stop is not None:
                self.stop = self.stop or stop
                return {j: self.outcomes.release(j, f"not sent: {stop}") for j in jobs}
            verdicts: dict[Job, Any] = {}
            go = [j for j in jobs if j.view_version == st.version]
            stale = [j for j in jobs if j.view_version != st.version]
            if stale:
                ctxs = load_member_contexts(conn, [j.row for j in stale], now, policy)
                for j in stale:
                    out = self._recheck(j, ctxs.get((j.row["member_id"], j.row["purpose"])))
                    if out is None:
                        j.view_version = st.version
                        go.append(j)
                    else:
                        verdicts[j] = out
            if go:
                marked = _mark_attempted(conn, go, now)
                for j in go:
                    verdicts[j] = GO if j.row["id"] in marked else DROP
            return verdicts

        return in_transaction(self.engine, work)

    def _recheck(self, job: Job, ctx: MemberContext | None) -> Outcome | None:
        """Route the job again on a fresh view; None when its channel still may carry it (address refreshed)."""
        row = job.row
        settle = self.outcomes.settle
        if ctx is None:
            return settle(job, OutboxState.SKIPPED, Decision.NO_REACHABLE_CHANNEL,
                          "member no longer exists (checked right before sending)")
        old = job.channel
        rt = route(ctx, [old, *job.chain_rest], row["purpose"])
        if not rt.chain:
            return settle(job, rt.state, rt.code, f"checked right before sending: {rt.reason}")
        if rt.chain[0] != old:
            dropped = "; ".join(f"{r.channel}: {r.detail}" for r in rt.rejected if r.channel == old)
            nxt = rt.chain[0]
            if nxt not in job.contents:
                return settle(job, OutboxState.FAILED, Decision.PERMANENT_FAILURE,
                              f"{old} no longer allowed right before sending ({dropped}) and no rendered "
                              f"content for {nxt}")
            job.channel, job.chain_rest = nxt, rt.chain[1:]
            # Not sent now (the rate-limit token was taken for the other channel): planned again on the next one.
            return outcome_for(row, self.outcomes.values(
                job, state=OutboxState.PLANNED, code=Decision.FALLBACK,
                reason=f"via {nxt}: {old} no longer allowed right before sending ({dropped})"), kind="fallback")
        job.ctx, job.chain_rest = ctx, rt.chain[1:]
        to = ctx.address(old) or ""
        if job.message is not None and job.message.to != to:
            job.message = dataclasses.replace(job.message, to=to)
        return None


_outbox = OutboxMessage.__table__
# Built once: the gate runs it for every group of messages (a reused statement skips construction and
# cache-key generation in SQLAlchemy).
_MARK = (sa.update(_outbox)
         .where(_outbox.c.id.in_(sa.bindparam("ids", expanding=True)), _outbox.c.state == OutboxState.SENDING.value,
                _outbox.c.claimed_by == sa.bindparam("token"))
         .values(attempt_started_at=sa.bindparam("now", type_=_outbox.c.attempt_started_at.type))
         .returning(_outbox.c.id))


def _mark_attempted(conn: Connection, go: list[Job], now: datetime) -> set[int]:
    """Record the attempt (``attempt_started_at``) of the rows still held under their claim; returns their ids."""
    o = OutboxMessage.__table__
    marked: set[int] = set()
    for token in sorted({j.row["claim"] for j in go}):
        marked.update(conn.execute(_MARK, {"ids": [j.row["id"] for j in go if j.row["claim"] == token],
                                           "token": token, "now": now}).scalars())
    # The pre-send check at claim may have moved a row to another channel: record the channel it
    # is attempted on, so that reconciliation after a crash asks the right provider.
    moved = [j for j in go if j.channel != j.row["channel"] and j.row["id"] in marked]
    for ch in sorted({j.channel for j in moved}):
        conn.execute(sa.update(o).where(o.c.id.in_([j.row["id"] for j in moved if j.channel == ch]))
                     .values(channel=ch))
    return marked
