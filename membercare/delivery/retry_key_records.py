"""Settling ``unknown`` rows of a provider that has no message lookup but deduplicates on a client key: LINE.

LINE's Messaging API cannot tell whether a message was sent, but every push and multicast carries
``X-Line-Retry-Key``, LINE's own idempotency: the same request sent again with the same key **within 24
hours** answers 409 with ``X-Line-Accepted-Request-Id`` when the first one was accepted (nothing is
delivered again), and is accepted normally when the first one never arrived. So an ``unknown`` LINE row
(the dispatcher crashed after its request began, or the answer was lost) is settled by *repeating its
request*: 409 -> it was sent; 200 -> it had not arrived and is sent now, once. Either way it is ``sent``.

:class:`RetryKeyRecords` is that, as a :class:`~membercare.delivery.reconcile.ProviderVerdicts` source:

* **Which request.** A row sent alone repeats its push, whose retry key derives from the outbox key. A row
  sent in a multicast (:mod:`membercare.delivery.dispatch_batch`) names its batch in
  ``provider_message_id`` (``batch:...``, written before the request): the multicast is repeated for every
  ``unknown`` row of that batch at once, with the batch's key, and all of them are settled together.
* **The send gate still holds.** A repeat may deliver the message, so it is made only when sending is
  allowed right now: not while the kill switch is on or the run is paused or cancelled, and only to
  members whose consent, suppression and LINE link still allow a LINE message and who are outside their
  quiet hours (checked in one gate transaction right before the request). A member who is no longer
  allowed is left out of the repeated request: 409 settles them ``sent`` too (the first request reached
  them); 200 means the first request never arrived, so they were never sent and go back to ``planned``
  (the dispatcher's pre-send check then settles them ``skipped`` or ``suppressed``, or defers them past
  their quiet hours). With nobody left to send to, the row waits.
* **Only within the key's validity.** The 24 hours run from the first request that carried the key. We
  bound that moment from below (``attempt_started_at`` of a crashed attempt, the outcome time of an
  ambiguous one, the row's creation when it had attempts before with the same key) and stop ``margin``
  (default 1 h, for clock differences and request time-outs) before the 24 hours end. Past that, a repeat
  could be delivered a second time, so the row is **never** resent: it is reported for an operator
  (``unknown_not_resent`` with the reason), transactional rows included.
* **Undecided** (the repeat failed: 5xx, 429, a dropped connection; sending paused; nobody allowed): the
  row is left as it is, excluded from the grace-period policy of
  :func:`~membercare.delivery.reconcile.reconcile_unknown`, and tried again on the next pass.

Repeating is safe however often it happens (two reconcilers at once, a crash in the middle, results lost):
LINE accepts one request per key. :meth:`RetryKeyRecords.lookup` (asked before a transactional row is sent
again after an ambiguous failure of its own) finds nothing: that resend repeats the same push with the same
key anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.contract import Accepted, OutboundMessage, SendResult
from membercare.delivery.dispatch_batch import BATCH_KEY_PREFIX
from membercare.delivery.dispatch_claim import load_member_contexts
from membercare.delivery.gate import lock_for_gate, read_gate
from membercare.delivery.models import Decision, OutboxMessage, OutboxState, RunStatus, decode_contents
from membercare.delivery.policies import PolicySettings, load_policy, member_zone, quiet_hours_until
from membercare.delivery.reconcile import Settlement
from membercare.delivery.routing import route
from membercare.delivery.sqlutil import any_of
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose
from membercare.timeutil import ensure_utc, utcnow

log = logging.getLogger(__name__)

# LINE keeps a retry key for 24 hours after the first request that carried it.
LINE_RETRY_KEY_VALIDITY = timedelta(hours=24)


class RetryKeySender(Protocol):
    """What :class:`RetryKeyRecords` needs of an adapter (``channels.line.adapter.LineChannel`` has both):
    ``send`` derives the idempotency key from ``message.idempotency_key``, ``send_many`` from
    ``batch_key`` (see :class:`~membercare.delivery.contract.BatchSender`); an already accepted key
    answers ``Accepted`` with ``status`` 409."""

    def send(self, message: OutboundMessage) -> SendResult: ...

    def send_many(self, messages: Sequence[OutboundMessage], batch_key: str) -> list[SendResult | None]: ...


@dataclass
class _Row:
    id: int
    message_id: str
    idempotency_key: str
    run_id: int
    member_id: int
    campaign: str
    purpose: str
    content: bytes | None
    provider_message_id: str | None
    reason_code: str
    attempts: int
    attempt_started_at: datetime | None
    created_at: datetime
    updated_at: datetime
    to: str = ""  # the member's address now, filled by the gate check (the ledger holds none)

    @property
    def batch(self) -> str | None:
        pmid = self.provider_message_id or ""
        return pmid if pmid.startswith(BATCH_KEY_PREFIX) else None

    def first_request_after(self) -> datetime:
        """A moment no later than the first request that carried this row's key (see the module docstring)."""
        crashed = self.reason_code == Decision.IN_FLIGHT_AT_CRASH.value and self.attempt_started_at is not None
        earlier = self.attempts > (0 if crashed else 1)  # attempts before this one, with the same key maybe
        if earlier:
            return self.created_at
        if crashed and self.attempt_started_at is not None:
            return self.attempt_started_at
        return self.updated_at  # the outcome of the ambiguous request, written right after it


class RetryKeyRecords:
    """LINE's retry keys as a :class:`~membercare.delivery.reconcile.ProviderVerdicts` source (see the module
    docstring). ``sender`` is the LINE adapter; ``policy`` the delivery policy (read from the database when
    ``None``); ``validity`` the provider's key lifetime and ``margin`` how long before its end we stop."""

    def __init__(self, engine: Engine, sender: RetryKeySender, *, channel: Channel = Channel.LINE,
                 validity: timedelta = LINE_RETRY_KEY_VALIDITY, margin: timedelta = timedelta(hours=1),
                 policy: PolicySettings | None = None, clock: Callable[[], datetime] = utcnow):
        self.engine, self.sender, self.channel = engine, sender, channel
        self.validity, self.margin, self.policy, self.clock = validity, margin, policy, clock

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        """Nothing can be looked up without sending (see the module docstring)."""
        return {}

    def settle(self, message_ids: Sequence[str], *, now: datetime) -> Settlement:
        now = ensure_utc(now)
        out = Settlement()
        units: dict[str, list[_Row]] = {}
        for row in self._rows(message_ids):
            key = row.batch or f"row:{row.id}"
            if key not in units:
                units[key] = self._batch_rows(row.batch) if row.batch else [row]
        for rows in units.values():
            self._settle_unit(rows, now, out)
        return out

    # ---------------------------------------------------------------------------------------------------

    def _settle_unit(self, rows: list[_Row], now: datetime, out: Settlement) -> None:
        """One request: its rows are settled together."""
        name = self.channel.value.upper() if self.channel is Channel.LINE else self.channel.value
        if any(r.reason_code == Decision.UNKNOWN_NOT_RESENT.value for r in rows):
            # Already reported (by us after the key expired, or by the grace period before this source was
            # configured: its ``updated_at`` no longer dates the request). Never repeated.
            for r in rows:
                out.for_operator[r.message_id] = "outcome unknown; already reported for an operator"
            return
        deadline = min(r.first_request_after() for r in rows) + self.validity - self.margin
        if now >= deadline:
            why = (f"outcome unknown and {name}'s retry key has expired (it deduplicates a repeated request for "
                   f"{self.validity} after the first; the request began no earlier than "
                   f"{deadline - self.validity + self.margin:%Y-%m-%d %H:%M} UTC): {name} has no lookup for a sent "
                   "message, so it cannot be settled and is not resent; an operator decides (e.g. from the "
                   "LINE Official Account Manager's message history)")
            for r in rows:
                out.for_operator[r.message_id] = why
            return
        allowed, wait = self._gate(rows, now)
        if wait is not None:
            for r in rows:
                out.pending[r.message_id] = wait
            return
        batch = rows[0].batch
        try:
            result = self._repeat(allowed, batch)
        except ConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - a repeat is idempotent: the next pass tries again
            log.warning("repeating a %s request with its retry key failed (%s); tried again later", name,
                        type(exc).__name__)
            result = None
        if not isinstance(result, Accepted):
            what = getattr(result, "reason", None) or getattr(result, "detail", None) or "no answer"
            for r in rows:
                out.pending[r.message_id] = f"repeating the request with its retry key failed: {what}"[:300]
            return
        how = "crash" if rows[0].reason_code == Decision.IN_FLIGHT_AT_CRASH.value else "ambiguous failure"
        sent_ids = {r.id for r in allowed}
        for r in rows:
            if result.status == 409:
                out.found[r.message_id] = result.provider_message_id
                out.notes[r.message_id] = (f"{name} answered 409 to the same request with the same retry key after "
                                           f"a {how}: the first request was accepted, nothing was sent again")
            elif r.id in sent_ids:
                out.found[r.message_id] = result.provider_message_id
                out.notes[r.message_id] = (f"the request had not reached {name} before the {how}: sent now by "
                                           "reconciliation with the same retry key (once)")
            else:
                out.never_received[r.message_id] = (
                    f"the request had not reached {name} (a repeat with its retry key was accepted as new) and the "
                    f"member may not receive {name} messages now, so they were left out of the repeat")

    def _repeat(self, rows: list[_Row], batch: str | None) -> SendResult | None:
        """Send the same request again, with the same key, to the members still allowed."""
        messages = [m for m in (self._message(r) for r in rows) if m is not None]
        if len(messages) != len(rows):
            return None
        if batch is None:
            return self.sender.send(messages[0])
        results = self.sender.send_many(messages, batch)
        return results[0] if results else None

    def _message(self, row: _Row) -> OutboundMessage | None:
        content = decode_contents(row.content).get(self.channel.value)
        if content is None:
            return None
        return OutboundMessage(message_id=row.message_id, idempotency_key=row.idempotency_key, channel=self.channel,
                               purpose=Purpose(row.purpose), to=row.to, content=content, campaign=row.campaign,
                               categories=(row.campaign,))

    def _gate(self, rows: list[_Row], now: datetime) -> tuple[list[_Row], str | None]:
        """The rows whose member may receive this channel's message right now (with the address), or why
        no repeat may be made now."""
        ch = self.channel.value
        name = ch.upper() if self.channel is Channel.LINE else ch

        def work(conn: Connection) -> tuple[list[_Row], str | None]:
            lock_for_gate(conn)
            st = read_gate(conn, rows[0].run_id)
            if st.paused_all:
                return [], f"not repeated now: all sending is paused ({st.paused_reason or 'kill switch'})"
            if st.run_status == RunStatus.PAUSED.value:
                return [], f"not repeated now: the run is paused ({st.run_reason or 'no reason'})"
            policy = self.policy or load_policy(conn)
            raw = [{"member_id": r.member_id, "purpose": r.purpose} for r in rows]
            ctxs = load_member_contexts(conn, raw, now, policy)
            allowed = []
            for r in rows:
                ctx = ctxs.get((r.member_id, r.purpose))
                if ctx is None or not ctx.address(ch):
                    continue
                rt = route(ctx, [ch], r.purpose)
                quiet = quiet_hours_until(now, ch, r.purpose, member_zone(ctx.timezone, policy.fallback_timezone),
                                          policy)
                if rt.chain and rt.chain[0] == ch and quiet is None:
                    r.to = ctx.address(ch) or ""
                    allowed.append(r)
            if not allowed:
                return [], (f"not repeated now: no member of the request may receive {name} messages now "
                            "(consent, suppression, link or quiet hours)")
            return allowed, None

        return in_transaction(self.engine, work)

    def _rows(self, message_ids: Sequence[str]) -> list[_Row]:
        o = OutboxMessage.__table__
        if not message_ids:
            return []
        with self.engine.connect() as conn:
            return [_Row(**r) for r in conn.execute(
                _select().where(any_of(conn, o.c.message_id, list(message_ids)), o.c.channel == self.channel.value,
                                o.c.state == OutboxState.UNKNOWN.value).order_by(o.c.id)).mappings()]

    def _batch_rows(self, batch: str) -> list[_Row]:
        o = OutboxMessage.__table__
        with self.engine.connect() as conn:
            return [_Row(**r) for r in conn.execute(
                _select().where(o.c.provider_message_id == batch, o.c.channel == self.channel.value,
                                o.c.state == OutboxState.UNKNOWN.value).order_by(o.c.id)).mappings()]


def _select() -> Any:
    o = OutboxMessage.__table__
    return sa.select(o.c.id, o.c.message_id, o.c.idempotency_key, o.c.run_id, o.c.member_id, o.c.campaign,
                     o.c.purpose, o.c.content, o.c.provider_message_id, o.c.reason_code, o.c.attempts,
                     o.c.attempt_started_at, o.c.created_at, o.c.updated_at)
