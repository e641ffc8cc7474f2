"""Claiming due rows and the pre-send checks of each claimed batch.

* **Claiming** (:meth:`Claimer.claim`): one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE
  SKIP LOCKED) RETURNING ...`` statement. On PostgreSQL, concurrent dispatchers on one run skip each
  other's locked rows, so no row is claimed twice. On SQLite the statement is the transaction's first
  and only one, so it takes the database write lock for its whole read-and-update (SQLite has one writer).
  Every claim has its own token (``<worker id>/<claim number>``), which guards the row's send gate and the
  recording of its outcome.
* **Pre-send checks** per claimed batch, set-based: consent and suppression are re-checked (an
  unsubscribe that arrived after planning wins), quiet hours are applied at the actual send time, and
  the address is resolved from the member (the ledger holds none). Transactional rows resent after an
  ambiguous failure are first looked up in the provider's records (``records``): found there, they are
  settled as sent instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.contract import ChannelAdapter, OutboundMessage
from membercare.delivery.dispatch_outcomes import Outcomes
from membercare.delivery.dispatch_types import Job, Outcome, outcome_for
from membercare.delivery.gate import read_version
from membercare.delivery.models import CLAIMABLE_STATES, Decision, OutboxMessage, OutboxState, decode_contents
from membercare.delivery.policies import PolicySettings, member_zone, quiet_hours_until
from membercare.delivery.reconcile import ProviderRecords
from membercare.delivery.routing import MemberContext, load_contexts, route
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose

# One logger for all the dispatcher's parts: operators and tests select dispatch logs by this name.
log = logging.getLogger("membercare.delivery.dispatcher")


def load_member_contexts(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime,
                         policy: PolicySettings) -> dict[tuple[int, str], MemberContext]:
    """The member contexts (consent, suppression, addresses) of ``rows``, by (member id, purpose)."""
    contexts: dict[tuple[int, str], MemberContext] = {}
    for purpose in {r["purpose"] for r in rows}:
        ids = sorted({r["member_id"] for r in rows if r["purpose"] == purpose})
        ctxs = load_contexts(conn, ids, purpose, now, timedelta(days=policy.push_token_max_age_days),
                             full_rows=False)
        for mid, ctx in ctxs.items():
            contexts[(mid, purpose)] = ctx
    return contexts


class Claimer:
    """Claims batches of one dispatcher's due rows and turns them into :class:`Job` s ready for the gate.

    ``held`` is the set of row ids this dispatcher claimed and has not recorded yet: after a dropped
    connection, rows claimed under this worker id that are not held (the claim's answer was lost) are
    handed back (:meth:`release_orphans`).
    """

    def __init__(self, engine: Engine, worker_id: str, adapters: Mapping[str, ChannelAdapter],
                 outcomes: Outcomes, clock: Callable[[], datetime], records: ProviderRecords | None):
        self.engine, self.worker_id, self.adapters = engine, worker_id, adapters
        self.outcomes, self.clock, self.records = outcomes, clock, records
        self.held: set[int] = set()
        self._claims = 0

    def claim(self, run: sa.Row[Any], limit: int, policy: PolicySettings, buffer: list[Outcome]) -> list[Job]:
        """Claim up to ``limit`` due rows of ``run``. Rows that must not be sent now go to ``buffer`` as
        outcomes; the others come back as jobs with their message built. A missing adapter raises
        :class:`ConfigurationError` after every row of the batch was released into ``buffer``."""
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
                self.release_orphans(conn, run.id, now)
            res = conn.execute(stmt)
            keys = tuple(res.keys())
            return [dict(zip(keys, r, strict=True)) for r in res.all()]

        rows = in_transaction(self.engine, claim)
        if not rows:
            return []
        self.held.update(r["id"] for r in rows)
        rows = self._settle_ambiguous(rows, buffer)
        if not rows:
            return []
        # The version is read before the view it versions: a change committed in between is then seen as
        # newer than the view, and the gate reloads it.
        version, contexts = in_transaction(self.engine, lambda conn: (
            read_version(conn), load_member_contexts(conn, rows, now, policy)))
        return self._jobs(rows, contexts, version, now, policy, buffer)

    def _jobs(self, rows: list[dict], contexts: dict[tuple[int, str], MemberContext], version: int,
              now: datetime, policy: PolicySettings, buffer: list[Outcome]) -> list[Job]:
        jobs: list[Job] = []
        for i, row in enumerate(rows):
            ctx = contexts.get((row["member_id"], row["purpose"]))
            chain = [row["channel"], *[c for c in row["fallback_channels"].split(",") if c]]
            job = Job(row, ctx, row["channel"], tuple(chain[1:]), decode_contents(row["content"]),
                      view_version=version)
            try:
                ready = self._prepare(job, chain, now, policy)
            except ConfigurationError:
                # Nothing of this batch was sent: hand every row back before stopping.
                release = self.outcomes.release
                buffer.extend(release(j, "not sent: configuration error") for j in jobs)
                buffer.extend(release(Job(r, None, r["channel"], (), {}), "not sent: configuration error")
                              for r in rows[i:])
                raise
            if ready is None:
                jobs.append(job)
            else:
                buffer.append(ready)
        return jobs

    def forget(self, ids: Iterable[int]) -> None:
        """These rows are recorded (or no longer ours): they are not held any more."""
        self.held.difference_update(ids)

    def release_orphans(self, conn: Connection, run_id: int | None, now: datetime) -> None:
        o = OutboxMessage.__table__
        cond = [o.c.run_id == run_id, o.c.state == OutboxState.SENDING.value,
                o.c.claimed_by.startswith(f"{self.worker_id}/", autoescape=True), o.c.attempt_started_at.is_(None)]
        held = sorted(self.held)
        if held:
            cond.append(o.c.id.not_in(held))
        res = conn.execute(sa.update(o).where(*cond).values(
            state=OutboxState.PLANNED.value, claimed_by=None, claimed_at=None, updated_at=now,
            last_error="claim answer lost with a dropped database connection; never attempted"))
        if res.rowcount:
            log.warning("released %d row(s) claimed through a dropped database connection", res.rowcount)

    def _settle_ambiguous(self, rows: list[dict], buffer: list[Outcome]) -> list[dict]:
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
            job = Job(r, None, r["channel"], tuple(c for c in r["fallback_channels"].split(",") if c), {})
            buffer.append(outcome_for(r, self.outcomes.values(
                job, state=OutboxState.SENT, code=Decision.RECONCILED, sent_at=self.clock(),
                provider_message_id=found[r["message_id"]] or None,
                reason=f"sent via {r['channel']}: the provider has a record of it after an ambiguous failure; "
                       "not resent"), kind="reconciled"))
        return keep

    def _prepare(self, job: Job, chain: list[str], now: datetime, policy: PolicySettings) -> Outcome | None:
        """Pre-send checks. Returns an outcome when the row must not be sent now, else fills ``job.message``."""
        row = job.row
        settle = self.outcomes.settle
        if job.ctx is None:
            return settle(job, OutboxState.SKIPPED, Decision.NO_REACHABLE_CHANNEL, "member no longer exists")
        rt = route(job.ctx, chain, row["purpose"])
        if not rt.chain:
            return settle(job, rt.state, rt.code, f"checked before sending: {rt.reason}")
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
            return outcome_for(row, self.outcomes.values(
                job, state=OutboxState.DEFERRED, code=Decision.QUIET_HOURS, reason=row["reason"],
                next_attempt_at=until, last_error=f"quiet hours: deferred to {until.isoformat()}"),
                kind="quiet_hours")
        content = job.contents.get(job.channel)
        if content is None:
            return settle(job, OutboxState.FAILED, Decision.PERMANENT_FAILURE,
                          f"no rendered content for {job.channel} in the ledger")
        if job.channel not in self.adapters:
            raise ConfigurationError(f"no adapter configured for channel {job.channel}")
        job.message = OutboundMessage(
            message_id=row["message_id"], idempotency_key=row["idempotency_key"], channel=Channel(job.channel),
            purpose=Purpose(row["purpose"]), to=job.ctx.address(job.channel) or "", content=content,
            campaign=row["campaign"], categories=(row["campaign"],),
        )
        return None
