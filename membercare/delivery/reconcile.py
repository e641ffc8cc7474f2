"""Crash recovery and reconciliation of messages whose outcome we do not know.

A row is ``sending`` from the moment a dispatcher committed its claim until it recorded the
provider's answer. If the process dies in between, the provider may or may not have accepted the
message. Policy (see ``docs/delivery.md``):

1. :func:`recover_stale` takes back ``sending`` rows whose claim is older than the lease: rows the
   dispatcher never attempted (no ``attempt_started_at``: the send gate never let them through) go back
   to ``planned`` and are sent; attempted ones become ``unknown`` (reason ``in_flight_at_crash``) and
   are **never** resent automatically at this point.
2. :func:`reconcile_unknown` looks each unknown row up in the provider's records (a
   :class:`ProviderRecords` source, e.g. the sandbox's ``GET /sandbox/messages``) and marks the ones it
   finds ``sent``. Provider events (delivered, opened, bounced...) carrying our message id do the same
   through :func:`mark_sent_from_event`, whenever they arrive.
3. A source that can also say which messages the provider **never** received (a
   :class:`ProviderVerdicts`, e.g. Twilio's message list in :mod:`membercare.delivery.provider_records`)
   sends those rows again, marketing included (reason ``never_received``): no duplicate is possible.
4. A source can hold rows back from step 5 (``Settlement.pending``: it is still settling them) or report
   them for an operator for good (``Settlement.for_operator``): LINE's retry keys
   (:mod:`membercare.delivery.retry_key_records`) settle a row by repeating its request with the same
   key within the key's 24 hours, and past them nothing may be resent.
5. After the grace period, rows still without a record stay ``unknown`` for **marketing** (no duplicate
   is preferred to no loss; the reason says so) and go back to ``planned`` for **transactional**
   messages (no loss is preferred: an order confirmation must arrive, and a rare duplicate is the price,
   because none of SendGrid's mail send, Twilio's Messages or FCM's v1 send deduplicates on a client key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.models import Decision, OutboxMessage, OutboxState
from membercare.models import Purpose
from membercare.timeutil import ensure_utc, utcnow


class ProviderRecords(Protocol):
    """Extension point: which of our message ids a provider has a record of.

    Returns ``{message_id: provider_message_id}`` for the ids it knows. Implementations must not raise
    for ids they do not know; a lookup that cannot be made at all should raise, so that nothing is
    concluded from silence.
    """

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]: ...


@dataclass
class Settlement:
    """What a :class:`ProviderVerdicts` source concluded about a batch of message ids.

    ``found``: ``{message_id: provider_message_id}`` the provider accepted. ``never_received``:
    ``{message_id: why}`` the provider's complete records show it never accepted (the reason is stored
    on the row, so it must name no address). ``notes``: ``{message_id: how it was found}`` (optional
    prose for the row's reason). ``pending``: ``{message_id: why}`` still being settled by the source
    (the grace-period policy must not touch them yet). ``for_operator``: ``{message_id: why}`` that can
    never be settled and must never be resent, transactional included (left ``unknown`` with the reason).
    An id in none of them is undecided. A source may settle ids it was not asked about (the other rows of
    one multicast request): they are applied too.
    """

    found: dict[str, str] = field(default_factory=dict)
    never_received: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    for_operator: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class ProviderVerdicts(ProviderRecords, Protocol):
    """Extension point beyond :class:`ProviderRecords` (so it has ``lookup`` too): a source that can also
    *confirm absence*.

    ``settle(message_ids, now=...)`` returns a :class:`Settlement`. Only claim ``never_received`` when the
    provider's records for the message's recipient and time window are complete (every page read, past
    any queueing delay) and hold nothing that could be the message: :func:`reconcile_unknown` sends those
    rows again, marketing included. Ids of other channels and unknown ids are simply left out. A lookup
    that cannot be made should raise, so that nothing is concluded from silence.
    """

    def settle(self, message_ids: Sequence[str], *, now: datetime) -> Settlement: ...


@dataclass
class StaticRecords:
    """Records handed in directly (tests; a provider export loaded by an operator)."""

    records: Mapping[str, str] = field(default_factory=dict)

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        return {m: self.records[m] for m in message_ids if m in self.records}


class SandboxRecords:
    """The provider sandbox's record of accepted messages (``GET {base_url}/sandbox/messages``).

    The sandbox answers ``{"messages": [{"seq", "channel", "provider_id", "message_id", "idempotency_key",
    "to", "account", "ghost", "accepted_at"}, ...], "count", "last_seq"}`` (see
    ``membercare.sandbox.state.MessageRecord.to_json``). Records are fetched incrementally (``?since=`` the
    last sequence number seen, in pages of ``page_size``) and kept in memory, so reconciling many batches
    of unknown rows reads each record once. Thread-safe.
    """

    def __init__(self, base_url: str, *, message_id_field: str = "message_id",
                 provider_id_field: str = "provider_id", timeout: float = 10.0, page_size: int = 50_000):
        import threading

        self.base_url = base_url.rstrip("/")
        self.message_id_field, self.provider_id_field, self.timeout = message_id_field, provider_id_field, timeout
        self.page_size = page_size
        self._known: dict[str, str] = {}
        self._last_seq = 0
        self._lock = threading.Lock()

    def refresh(self) -> int:
        """Fetch the records accepted since the last call; returns how many arrived."""
        import httpx

        with self._lock:
            added = 0
            with httpx.Client(timeout=self.timeout) as client:
                while True:
                    resp = client.get(f"{self.base_url}/sandbox/messages",
                                      params={"since": self._last_seq, "limit": self.page_size})
                    resp.raise_for_status()
                    body = resp.json()
                    items = body["messages"]
                    for item in items:
                        mid = item.get(self.message_id_field)
                        if mid:
                            # The first acceptance wins: a duplicate would carry another provider id.
                            self._known.setdefault(str(mid), str(item.get(self.provider_id_field) or ""))
                    added += len(items)
                    self._last_seq = int(body.get("last_seq", self._last_seq))
                    if len(items) < self.page_size:
                        return added

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        self.refresh()
        return {m: self._known[m] for m in message_ids if m in self._known}


NEVER_ATTEMPTED_NOTE = "; its dispatcher stopped before the provider call, sent again"


@dataclass(frozen=True)
class Recovered:
    """What :func:`recover_stale` did: rows sent back to be sent, rows whose outcome is unknown."""

    unattempted: int = 0
    unknown: int = 0

    @property
    def total(self) -> int:
        return self.unattempted + self.unknown


def recover_stale(engine: Engine, *, lease: timedelta, run_id: int | None = None,
                  now: datetime | None = None) -> Recovered:
    """Take back ``sending`` rows of dispatchers that stopped (their claim or attempt older than ``lease``).

    * Claimed but never attempted (``attempt_started_at`` unset: the send gate never let them through, so
      no provider call began): back to ``planned``, reason ``never_attempted``. They will be sent.
    * Attempted (the provider call may have begun): ``unknown``, reason ``in_flight_at_crash``. They are
      never resent automatically at this point; :func:`reconcile_unknown` settles them.

    The lease must be longer than the slowest send (adapter timeout) plus the dispatcher's flush interval
    for attempted rows, and longer than a claimed batch waits for its rate-limit tokens for unattempted
    ones; a live dispatcher's late answer for a row recovered this way is ignored (its update is guarded
    by ``state = 'sending' AND claimed_by``) and the send gate refuses a row that is no longer its own.
    """
    o = OutboxMessage.__table__
    now = ensure_utc(now or utcnow())
    base = [o.c.state == OutboxState.SENDING.value]
    if run_id is not None:
        base.append(o.c.run_id == run_id)
    who = sa.func.coalesce(o.c.claimed_by, "?")

    def work(conn: Connection) -> Recovered:
        never = conn.execute(sa.update(o).where(
            *base, o.c.attempt_started_at.is_(None), o.c.claimed_at <= now - lease).values(
            state=OutboxState.PLANNED.value, reason_code=Decision.NEVER_ATTEMPTED.value, claimed_by=None,
            claimed_at=None, next_attempt_at=None, updated_at=now,
            # Kept in the prose reason, which the eventual "sent ..." reason carries on, for the audit trail.
            reason=sa.func.substr(o.c.reason + sa.literal(NEVER_ATTEMPTED_NOTE), 1, 500),
            last_error=sa.func.substr(sa.literal("claimed by dispatcher ") + who
                                      + sa.literal(" which stopped before the provider call; sending again"), 1, 500),
        )).rowcount or 0
        maybe = conn.execute(sa.update(o).where(
            *base, o.c.attempt_started_at.is_not(None), o.c.attempt_started_at <= now - lease).values(
            state=OutboxState.UNKNOWN.value, reason_code=Decision.IN_FLIGHT_AT_CRASH.value, updated_at=now,
            reason=sa.func.substr(sa.literal("in flight when dispatcher ") + who
                                  + sa.literal(" stopped; the provider may or may not have accepted it"), 1, 500),
        )).rowcount or 0
        return Recovered(never, maybe)

    return in_transaction(engine, work)


@dataclass
class ReconcileReport:
    checked: int = 0
    found_sent: int = 0
    left_unknown: int = 0
    requeued: int = 0
    never_received: int = 0  # the provider confirmed it never accepted them: back to planned
    pending: int = 0  # a source is still settling them (retried on the next pass)
    for_operator: int = 0  # can never be settled and are never resent: an operator decides


def reconcile_unknown(engine: Engine, *, run_id: int | None = None,
                      records: ProviderRecords | ProviderVerdicts | None = None,
                      grace: timedelta = timedelta(hours=1), now: datetime | None = None,
                      batch_size: int = 500) -> ReconcileReport:
    """Settle ``unknown`` rows: provider record -> sent; confirmed never received (a
    :class:`ProviderVerdicts` source) -> planned, whatever the purpose; past grace -> final unknown
    (marketing) or resend (transactional)."""
    o = OutboxMessage.__table__
    now = ensure_utc(now or utcnow())
    rep = ReconcileReport()
    last_id = 0
    while True:
        cond = [o.c.state == OutboxState.UNKNOWN.value, o.c.id > last_id]
        if run_id is not None:
            cond.append(o.c.run_id == run_id)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(o.c.id, o.c.message_id, o.c.purpose, o.c.claimed_at, o.c.updated_at,
                                          o.c.reason_code).where(*cond).order_by(o.c.id).limit(batch_size)).all()
        if not rows:
            return rep
        last_id = rows[-1].id
        rep.checked += len(rows)
        verdict = _ask(records, [r.message_id for r in rows], now)
        found, never, notes = verdict.found, verdict.never_received, verdict.notes
        asked = {r.message_id for r in rows}
        with engine.begin() as conn:
            for r in rows:
                if r.message_id in found:
                    how = notes.get(r.message_id) or "the provider has a record of it"
                    rep.found_sent += _mark_sent(conn, r.message_id, found[r.message_id], now, f"reconciled: {how}")
                    continue
                if r.message_id in never:
                    rep.never_received += _send_again(conn, r.message_id, never[r.message_id], now)
                    continue
                if r.message_id in verdict.for_operator:
                    rep.for_operator += _report(conn, r.id, r.reason_code, verdict.for_operator[r.message_id], now)
                    continue
                if r.message_id in verdict.pending:
                    rep.pending += 1
                    continue
                since = r.claimed_at or r.updated_at
                if since > now - grace:
                    continue  # events may still arrive
                if r.purpose == Purpose.TRANSACTIONAL:
                    still_unknown = sa.and_(o.c.id == r.id, o.c.state == OutboxState.UNKNOWN.value)
                    res = conn.execute(sa.update(o).where(still_unknown).values(
                        state=OutboxState.PLANNED.value, next_attempt_at=None, claimed_by=None, claimed_at=None,
                        reason_code=Decision.RESENT_AFTER_UNKNOWN.value, updated_at=now,
                        reason="outcome unknown and no provider record after the grace period; resending "
                               "(transactional: no loss over no duplicate; a duplicate is possible)"))
                    rep.requeued += res.rowcount or 0
                elif r.reason_code != Decision.UNKNOWN_NOT_RESENT:
                    conn.execute(sa.update(o).where(o.c.id == r.id, o.c.state == OutboxState.UNKNOWN.value).values(
                        reason_code=Decision.UNKNOWN_NOT_RESENT.value, updated_at=now,
                        reason="outcome unknown and no provider record after the grace period; not resent "
                               "(marketing: no duplicate over no loss)"))
                    rep.left_unknown += 1
                else:
                    rep.left_unknown += 1
            # Rows settled beside the ones asked about (the other rows of one request), in a later batch
            # otherwise: applied now, since the source's verdict covers them (e.g. a repeated multicast).
            for mid in sorted(set(found) - asked):
                how = notes.get(mid) or "the provider has a record of it"
                n = _mark_sent(conn, mid, found[mid], now, f"reconciled: {how}", only_unknown=True)
                rep.found_sent, rep.checked = rep.found_sent + n, rep.checked + n
            for mid in sorted(set(never) - asked):
                n = _send_again(conn, mid, never[mid], now)
                rep.never_received, rep.checked = rep.never_received + n, rep.checked + n


def _ask(records, message_ids: list[str], now: datetime) -> Settlement:
    """The verdict of a :class:`ProviderVerdicts` or a plain :class:`ProviderRecords` (found only)."""
    if records is None:
        return Settlement()
    if isinstance(records, ProviderVerdicts):
        verdict = records.settle(message_ids, now=now)
        found = dict(verdict.found)
        decided = set(found) | set(verdict.never_received)
        return Settlement(found=found, never_received={m: w for m, w in verdict.never_received.items()
                                                       if m not in found},
                          notes=dict(verdict.notes),
                          pending={m: w for m, w in verdict.pending.items() if m not in decided},
                          for_operator={m: w for m, w in verdict.for_operator.items() if m not in decided})
    return Settlement(found=dict(records.lookup(message_ids)))


def _report(conn: Connection, row_id: int, code: str, why: str, now: datetime) -> int:
    """An ``unknown`` row that can never be settled: reported for an operator, never resent."""
    if code == Decision.UNKNOWN_NOT_RESENT:
        return 1  # already reported; its reason stays as written then
    o = OutboxMessage.__table__
    res = conn.execute(sa.update(o).where(o.c.id == row_id, o.c.state == OutboxState.UNKNOWN.value).values(
        reason_code=Decision.UNKNOWN_NOT_RESENT.value, updated_at=now, reason=why[:500]))
    return res.rowcount or 0


def _send_again(conn: Connection, message_id: str, why: str, now: datetime) -> int:
    """An ``unknown`` row the provider confirms it never received goes back to ``planned``."""
    o = OutboxMessage.__table__
    res = conn.execute(sa.update(o).where(o.c.message_id == message_id, o.c.state == OutboxState.UNKNOWN.value).values(
        state=OutboxState.PLANNED.value, next_attempt_at=None, claimed_by=None, claimed_at=None,
        attempt_started_at=None, reason_code=Decision.NEVER_RECEIVED.value, updated_at=now,
        reason=(f"outcome was unknown; the provider confirms it never received it ({why}); sending it "
                "(no duplicate possible)")[:500]))
    return res.rowcount or 0


def _mark_sent(conn: Connection, message_id: str, provider_message_id: str | None, at: datetime, why: str, *,
               only_unknown: bool = False) -> int:
    o = OutboxMessage.__table__
    states = sa.or_(o.c.state.in_((OutboxState.UNKNOWN.value, OutboxState.SENDING.value, OutboxState.DEFERRED.value)),
                    sa.and_(o.c.state == OutboxState.PLANNED.value, o.c.attempts > 0))
    res = conn.execute(
        sa.update(o).where(
            o.c.message_id == message_id,
            o.c.state == OutboxState.UNKNOWN.value if only_unknown else states,
        ).values(state=OutboxState.SENT.value, reason_code=Decision.RECONCILED.value, reason=why[:500],
                 provider_message_id=sa.func.coalesce(o.c.provider_message_id, provider_message_id or None),
                 sent_at=sa.func.coalesce(o.c.sent_at, at), next_attempt_at=None, updated_at=utcnow())
    )
    return res.rowcount or 0


def mark_sent_from_event(conn: Connection, message_id: str, *, provider_message_id: str | None = None,
                         at: datetime | None = None, source: str = "provider event") -> bool:
    """A provider event carrying our message id proves the provider accepted the message.

    Called by the webhook receiver for every event. Settles rows that are unknown, still sending, or
    waiting for a retry after an ambiguous transient failure (a timeout after the provider accepted),
    which prevents the retry from sending a duplicate. Returns whether a row changed.
    """
    return _mark_sent(conn, message_id, provider_message_id, ensure_utc(at or utcnow()), f"reconciled: {source}") > 0

