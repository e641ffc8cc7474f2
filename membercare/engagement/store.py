"""Persist engagement events once and apply their effects in the same transaction.

:func:`ingest` is the single entry point for every source of engagement (the webhook receiver, our
own unsubscribe pages, and a dispatcher that learns of a dead push token). For a batch it:

1. resolves the member of each event: through our message id to the outbox row (the reliable path),
   else through the address (email compared case-insensitively, E.164 phone number, push token);
2. inserts the events with ``INSERT ... ON CONFLICT (provider, provider_event_id) DO NOTHING
   RETURNING``, in one statement per ~1000 rows, sorted by key so that concurrent PostgreSQL writers
   take row locks in the same order and cannot deadlock;
3. applies the effects of the events that were *new* (a redelivered webhook changes nothing):

   =================================  ==========================================================
   event                              effect
   =================================  ==========================================================
   bounced hard                       address suppressed (``hard_bounce``)
   complained                         address suppressed (``complaint``) and email marketing
                                      consent revoked, source ``complaint``
   rejected/failed with ``suppress``  address suppressed with that reason (e.g. SendGrid dropped
                                      "Bounced Address", Twilio 21211)
   unsubscribed (email)               email marketing consent revoked, source
                                      ``unsubscribe_link``
   resubscribed (email)               email marketing consent granted, source
                                      ``preference_center`` (the member rejoined on the
                                      provider's page)
   inbound STOP                       SMS marketing consent revoked, source ``sms_stop`` (on LINE:
                                      LINE marketing consent, ``line_stop``)
   LINE unfollow / follow             LINE marketing consent revoked / granted (``line_unfollow``,
                                      ``line_follow``); the parser's ``unsubscribe`` suppression of
                                      the user id makes a blocked member unreachable, a follow lifts it
   rejected ``opted_out`` (21610)     the same: the carrier already blocks us
   inbound START                      SMS marketing consent granted, source ``sms_start``, and an
                                      ``unsubscribe`` suppression of that number lifted
   push failed ``unregistered``       the device is invalidated (``devices.invalidated_at``)
   =================================  ==========================================================

   An opt-out whose member cannot be resolved is not lost: the address gets an ``unsubscribe``
   suppression, which routing honours like a revoked consent.

4. settles the outbox: a new provider event that carries our message id and proves the provider took
   the message (queued, sent, delivered, deferred, bounced, opened, clicked, complained, unsubscribed,
   push received/opened/dismissed) marks an outbox row that is still ``unknown``, ``sending`` or
   waiting for a retry ``sent`` (:func:`membercare.delivery.reconcile.mark_sent_from_event`). The
   row's state is read in the member lookup of step 1, so the common case (the row is already
   ``sent``) costs no extra statement.

Everything runs in the caller's transaction: the receiver commits before it answers 2xx, so an event
is either stored with its effects or not at all (and the provider retries).
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from membercare.consent import ConsentStatement, record_consents
from membercare.db import in_transaction, insert_for, is_sqlite
from membercare.delivery.models import OutboxMessage, OutboxState, Suppression, SuppressionReason, address_hash
from membercare.delivery.reconcile import mark_sent_from_event
from membercare.engagement.events import (
    REASON_OPTED_OUT,
    REASON_UNREGISTERED,
    BounceClass,
    EngagementEvent,
    EventKind,
    InboundCommand,
    Provider,
    clip,
    has_control,
    stable_key,
    usable_id,
)
from membercare.engagement.models import EngagementEventRow
from membercare.models import Channel, ConsentSource, Device, Member, Purpose
from membercare.timeutil import utcnow

_CHUNK = 500  # IN-list size for lookups: well inside every backend's parameter limit


@dataclass
class IngestResult:
    """What one :func:`ingest` call did. ``member_ids`` is aligned with the input events."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    suppressed: int = 0
    consent_changes: int = 0
    devices_invalidated: int = 0
    settled: int = 0  # outbox rows marked sent because a provider event proved acceptance
    member_ids: list[int | None] = field(default_factory=list)
    # {index of the input event: its fields that could not be used (see _usable)}: stored without them.
    cleaned: dict[int, tuple[str, ...]] = field(default_factory=dict)


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _in(conn: Connection, column, values: Sequence):
    """``column IN values``; on PostgreSQL ``= ANY(array)``: one parameter instead of hundreds keeps the
    statement short enough for psycopg's and the server's statement caches."""
    if is_sqlite(conn):
        return column.in_(values)
    return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))


# The longest address of each channel worth looking up (RFC 5321 caps a path at 256 octets; FCM tokens are
# a few hundred characters). Longer ones, like ones with control characters, cannot belong to a member.
_MAX_ADDRESS = {Channel.EMAIL.value: 320, Channel.SMS.value: 64, Channel.PUSH.value: 4096, Channel.LINE.value: 64}
_MAX_MESSAGE_ID = 32  # outbox_messages.message_id
_MAX_KEY = 128  # engagement_events.provider_event_id and provider_message_id


def normalise_recipient(channel: str, address: str | None) -> str | None:
    """The form members and suppressions are matched on (email case-folded, phone without spaces), or
    ``None`` when the address cannot be anybody's (control characters, absurd length)."""
    if not address:
        return None
    address = address.strip()
    if channel == Channel.EMAIL:
        address = address.lower()
    elif channel == Channel.SMS:
        address = "".join(address.split())
    return usable_id(address, _MAX_ADDRESS.get(str(channel), 4096))


def _usable(e: EngagementEvent) -> tuple[EngagementEvent, tuple[str, ...]]:
    """``e`` with every lookup key it cannot use removed, and the names of the fields that were.

    Providers' strings are unbounded and may hold NUL (which PostgreSQL text cannot store, failing the whole
    batch) or other control characters. An id or address like that is never cleaned into a different one,
    which could be another member's: our message id, the provider's message id and the recipient become
    ``None`` (the member is then found by the other keys, or not at all), and a dedupe key is replaced by a
    hash of it, so that a redelivery is still recognised. ``raw`` keeps the payload as received. Both
    databases therefore store and match exactly the same thing.
    """
    mid, pid, to, key = e.message_id or "", e.provider_message_id or "", e.recipient or "", e.dedupe_key
    if (len(mid) <= _MAX_MESSAGE_ID and len(pid) <= _MAX_KEY and 0 < len(key) <= _MAX_KEY
            and len(to) <= _MAX_ADDRESS.get(str(e.channel), 4096) and not has_control(mid + pid + to + key)):
        return e, ()  # the common case, in one scan
    changes: dict[str, Any] = {}  # field -> its replacement (fields of several types)
    if e.message_id is not None and usable_id(e.message_id, _MAX_MESSAGE_ID) is None:
        changes["message_id"] = None
    if e.provider_message_id is not None and usable_id(e.provider_message_id, _MAX_KEY) is None:
        changes["provider_message_id"] = None
    if e.recipient is not None and normalise_recipient(e.channel, e.recipient) is None:
        changes["recipient"] = None
    if usable_id(e.dedupe_key, _MAX_KEY) is None:
        changes["dedupe_key"] = stable_key("unusable key", e.dedupe_key)
    if not changes:
        return e, ()
    return replace(e, **changes), tuple(sorted(changes))


def _usable_events(events: Sequence[EngagementEvent]) -> tuple[list[EngagementEvent], dict[int, tuple[str, ...]]]:
    out, cleaned = [], {}
    for i, e in enumerate(events):
        e, dropped = _usable(e)
        out.append(e)
        if dropped:
            cleaned[i] = dropped
    return out, cleaned


# ---------------------------------------------------------------------------------------------------------------------
# Member resolution


# Outbox states that a provider event can settle (see reconcile.mark_sent_from_event); ``planned`` only
# after an attempt (a fallback or an ambiguous failure put it back).
_SETTLEABLE = (OutboxState.UNKNOWN.value, OutboxState.SENDING.value, OutboxState.DEFERRED.value)
# Event kinds that prove the provider accepted the message. Not ``rejected``/``failed`` (the provider
# refused it), ``inbound`` and ``resubscribed`` (not about one message) or ``unknown``.
_ACCEPTANCE_KINDS = frozenset({
    EventKind.QUEUED, EventKind.SENT, EventKind.DELIVERED, EventKind.DEFERRED, EventKind.BOUNCED, EventKind.OPENED,
    EventKind.CLICKED, EventKind.COMPLAINED, EventKind.UNSUBSCRIBED, EventKind.PUSH_RECEIVED, EventKind.PUSH_OPENED,
    EventKind.PUSH_DISMISSED,
})


def _members_by_message(conn: Connection, message_ids: set[str]) -> tuple[dict[str, int], set[str]]:
    """``{message_id: member_id}``, and the ids whose outbox row a provider event would settle."""
    if not message_ids:
        return {}, set()
    o = OutboxMessage.__table__
    found: dict[str, int] = {}
    unsettled: set[str] = set()
    for part in _chunks(sorted(message_ids)):
        query = sa.select(o.c.message_id, o.c.member_id, o.c.state, o.c.attempts).where(_in(conn, o.c.message_id, part))
        for mid, member, state, attempts in conn.execute(query):
            found[mid] = member
            if state in _SETTLEABLE or (state == OutboxState.PLANNED.value and attempts > 0):
                unsettled.add(mid)
    return found, unsettled


def _members_by_address(conn: Connection, wanted: dict[str, set[str]]) -> dict[tuple[str, str], list[int]]:
    """``{(channel, normalised address): [member ids]}`` for the addresses in ``wanted``."""
    m, d = Member.__table__, Device.__table__
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    emails = sorted(wanted.get(Channel.EMAIL, ()))
    for part in _chunks(emails):
        # Addresses are usually stored lower-cased: the indexed exact match finds those, and only the
        # rest pay for the case-insensitive comparison (a scan of members).
        rows = list(conn.execute(sa.select(m.c.id, m.c.email).where(_in(conn, m.c.email, part)).order_by(m.c.id)))
        rest = sorted(set(part) - {email for _, email in rows})
        if rest:
            rows.extend(conn.execute(
                sa.select(m.c.id, m.c.email)
                .where(_in(conn, sa.func.lower(m.c.email, type_=m.c.email.type), rest),
                       sa.not_(_in(conn, m.c.email, rest)))
                .order_by(m.c.id)
            ))
        for member_id, email in rows:
            found[(Channel.EMAIL.value, email.strip().lower())].append(member_id)
    phones = sorted(wanted.get(Channel.SMS, ()))
    for part in _chunks(phones):
        query = sa.select(m.c.id, m.c.phone).where(_in(conn, m.c.phone, part)).order_by(m.c.id)
        for member_id, phone in conn.execute(query):
            found[(Channel.SMS.value, phone)].append(member_id)
    line_ids = sorted(wanted.get(Channel.LINE, ()))
    for part in _chunks(line_ids):
        query = sa.select(m.c.id, m.c.line_user_id).where(_in(conn, m.c.line_user_id, part)).order_by(m.c.id)
        for member_id, line_id in conn.execute(query):
            found[(Channel.LINE.value, line_id)].append(member_id)
    tokens = sorted(wanted.get(Channel.PUSH, ()))
    for part in _chunks(tokens):
        for member_id, token in conn.execute(sa.select(d.c.member_id, d.c.token).where(_in(conn, d.c.token, part))):
            found[(Channel.PUSH.value, token)].append(member_id)
    return found


def resolve_members(conn: Connection, events: Sequence[EngagementEvent]) -> tuple[list[int | None], dict]:
    """Member id per event (or ``None``), and the address lookup used (for effects on unresolved events)."""
    members, by_address, _ = _resolve(conn, _usable_events(events)[0])
    return members, by_address


def _resolve(conn: Connection, events: Sequence[EngagementEvent]) -> tuple[list[int | None], dict, set[str]]:
    # ``events`` went through _usable: every key looked up here is one the database can hold.
    # Provider events never carry a member id, so every message id of a provider event is looked up here.
    by_message, unsettled = _members_by_message(
        conn, {e.message_id for e in events if e.message_id and e.member_id is None})
    wanted: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.member_id is None and by_message.get(e.message_id or "") is None:
            addr = normalise_recipient(e.channel, e.recipient)
            if addr:
                wanted[e.channel].add(addr)
    by_address = _members_by_address(conn, wanted) if wanted else {}
    out: list[int | None] = []
    for e in events:
        member = e.member_id if e.member_id is not None else by_message.get(e.message_id or "")
        if member is None:
            matches = by_address.get((e.channel.value, normalise_recipient(e.channel, e.recipient) or ""))
            member = matches[0] if matches else None
        out.append(member)
    return out, by_address, unsettled


# ---------------------------------------------------------------------------------------------------------------------
# Ingest


def _raw_json(raw) -> str:
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":"), default=str)


_UNENCODABLE = re.compile("[\x00\ud800-\udfff]")


def _text(value: str | None) -> str | None:
    """A free-text column (``url``, ``reason``): NUL removed (PostgreSQL text cannot hold it; a provider string
    with one must not make the batch fail forever) and lone surrogates (not encodable in UTF-8) replaced by
    U+FFFD. In ``raw`` a NUL survives as the JSON escape \\u0000."""
    if not value or not _UNENCODABLE.search(value):
        return value
    return _UNENCODABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)


def ingest(conn: Connection, events: Sequence[EngagementEvent], *, apply_effects: bool = True,
           received_at: datetime | None = None) -> IngestResult:
    """Store ``events`` once each and apply the effects of the new ones, inside the caller's transaction.

    ``apply_effects=False`` only records the events (for callers that applied the effect themselves,
    e.g. the preference centre, which records its consent statements with their own source).
    """
    result = IngestResult(received=len(events))
    if not events:
        return result
    received_at = received_at or utcnow()
    events, result.cleaned = _usable_events(events)
    member_ids, by_address, unsettled = _resolve(conn, events)
    result.member_ids = member_ids

    # One row per key (a batch may carry the same event twice); the first occurrence wins.
    rows: dict[tuple[str, str], dict] = {}
    index: dict[tuple[str, str], int] = {}
    for i, (e, member) in enumerate(zip(events, member_ids, strict=True)):
        key = (str(e.provider), e.dedupe_key)
        if key in rows:
            continue
        index[key] = i
        rows[key] = dict(
            provider=str(e.provider), provider_event_id=e.dedupe_key, kind=e.kind.value,
            bounce_class=e.bounce_class.value if e.bounce_class else None, channel=e.channel.value,
            message_id=e.message_id, provider_message_id=e.provider_message_id, member_id=member,
            occurred_at=e.occurred_at, received_at=received_at, url=_text(e.url), reason=clip(_text(e.reason), 500),
            raw=e.raw,
        )
    ordered = [rows[k] for k in sorted(rows)]
    inserted = _insert_events(conn, ordered)
    new_idx = sorted(index[(p, k)] for p, k in inserted)
    result.stored = len(new_idx)
    result.duplicates = result.received - result.stored
    if apply_effects and new_idx:
        _apply_effects(conn, [events[i] for i in new_idx], [member_ids[i] for i in new_idx], by_address, result)
    if unsettled and new_idx:
        result.settled = _settle_outbox(conn, [events[i] for i in new_idx], unsettled)
    return result


def _settle_outbox(conn: Connection, events: Sequence[EngagementEvent], unsettled: set[str]) -> int:
    """Mark the unsettled outbox rows that these (new) provider events prove accepted as ``sent``."""
    proof: dict[str, EngagementEvent] = {}
    for e in events:
        if (e.message_id in unsettled and e.kind in _ACCEPTANCE_KINDS and e.provider != Provider.MEMBERCARE
                and (e.message_id not in proof or e.occurred_at < proof[e.message_id].occurred_at)):
            proof[e.message_id] = e  # the earliest event bounds when it was sent
    settled = 0
    for mid, e in sorted(proof.items()):
        settled += mark_sent_from_event(conn, mid, provider_message_id=e.provider_message_id, at=e.occurred_at,
                                        source=f"{e.provider} {e.kind.value} event")
    return settled


_COLUMNS = ("provider", "provider_event_id", "kind", "bounce_class", "channel", "message_id", "provider_message_id",
            "member_id", "occurred_at", "received_at", "url", "reason", "raw")
_PG_TYPES = {"member_id": "bigint", "occurred_at": "timestamptz", "received_at": "timestamptz", "raw": "json"}


def _pg_insert(raw_type: str) -> sa.TextClause:
    types = {**_PG_TYPES, "raw": raw_type}
    record = ", ".join(f"{c} {types.get(c, 'text')}" for c in _COLUMNS)
    return sa.text(
        f"INSERT INTO engagement_events ({', '.join(_COLUMNS)}) "
        f"SELECT {', '.join('r.raw::text' if c == 'raw' else 'r.' + c for c in _COLUMNS)} "
        f"FROM json_to_recordset(CAST(:rows AS json)) AS r({record}) "
        "ON CONFLICT (provider, provider_event_id) DO NOTHING RETURNING provider, provider_event_id"
    )


_PG_INSERT = _pg_insert("json")
# For batches whose payloads contain U+0000, which PostgreSQL refuses to turn into text: the raw payload
# travels pre-serialised (its NUL stays the six characters \u0000 of its JSON text).
_PG_INSERT_RAW_TEXT = _pg_insert("text")


def _insert_events(conn: Connection, rows: list[dict]) -> list[tuple[str, str]]:
    """Insert ``rows`` (sorted by key) with ON CONFLICT DO NOTHING; returns the keys that were new."""
    if is_sqlite(conn):
        # SQLite runs in-process: a plain executemany (batched into multi-row statements by SQLAlchemy's
        # insertmanyvalues) is as fast as anything else here.
        t = EngagementEventRow.__table__
        ins = insert_for(conn, t).on_conflict_do_nothing(index_elements=["provider", "provider_event_id"])
        for r in rows:
            r["raw"] = _raw_json(r["raw"])
        return [tuple(r) for r in conn.execute(ins.returning(t.c.provider, t.c.provider_event_id), rows)]
    # PostgreSQL: the batch travels as ONE json parameter unpacked by json_to_recordset. A multi-row VALUES
    # statement with 13 parameters per row spends most of its time in client-side query conversion and
    # text-array parameters in per-element escaping; one JSON document is encoded in C and parsed by the
    # server in one go (about 4x faster for 1000-event SendGrid batches). The raw payload rides along as
    # a json value and is stored as its text, so it is not encoded twice.
    out: list[tuple[str, str]] = []
    for part in _chunks(rows, 5000):
        doc = json.dumps(part, ensure_ascii=False, separators=(",", ":"), default=_json_default)
        statement = _PG_INSERT
        if "\\u0000" in doc:
            for r in part:
                r["raw"] = _raw_json(r["raw"])
            doc = json.dumps(part, ensure_ascii=False, separators=(",", ":"), default=_json_default)
            statement = _PG_INSERT_RAW_TEXT
        out += [tuple(r) for r in conn.execute(statement, {"rows": doc})]
    return out


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


_writer_locks: dict[str, threading.Lock] = {}
_writer_locks_guard = threading.Lock()


def writer_lock(engine: Engine) -> AbstractContextManager[bool | None]:
    """A process-wide lock per SQLite database (SQLite has one writer; queueing in Python is cheaper than
    spinning on ``SQLITE_BUSY``). PostgreSQL needs none: row locks and ON CONFLICT handle concurrency."""
    if not is_sqlite(engine):
        return nullcontext()
    key = str(engine.url)
    with _writer_locks_guard:
        return _writer_locks.setdefault(key, threading.Lock())


def ingest_events(engine: Engine, events: Sequence[EngagementEvent], *, apply_effects: bool = True) -> IngestResult:
    """:func:`ingest` in its own committed transaction (what the receiver calls before answering 2xx)."""
    def work(conn: Connection) -> IngestResult:
        take_write_lock(conn)
        return ingest(conn, events, apply_effects=apply_effects)

    # A deadlock victim (PostgreSQL, against a dispatcher recording outcomes on the same rows) runs again:
    # its rollback left nothing, so the events count as new again and nothing is applied twice.
    with writer_lock(engine):
        return in_transaction(engine, work)


def take_write_lock(conn: Connection) -> None:
    """On SQLite, make the transaction a writer from its first statement.

    :func:`ingest` reads (member lookup) before it writes. In a deferred SQLite transaction that read
    pins a WAL snapshot, and if another process (a dispatcher) commits before our first write, the
    upgrade to a writer fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT: the busy timeout
    does not apply). A write that matches nothing takes the write lock up front, so we wait our turn
    instead. PostgreSQL needs nothing.
    """
    if is_sqlite(conn):
        conn.execute(sa.text("DELETE FROM engagement_events WHERE 0 = 1"))


# ---------------------------------------------------------------------------------------------------------------------
# Effects


def _consent(member: int, channel: Channel, granted: bool, source: ConsentSource,
             e: EngagementEvent) -> ConsentStatement:
    detail = f"{e.provider} {e.kind.value} {e.dedupe_key}"[:500]
    return ConsentStatement(member_id=member, channel=channel.value, purpose=Purpose.MARKETING.value, granted=granted,
                            source=source.value, occurred_at=e.occurred_at, detail=detail)


def _addresses_of(conn: Connection, member_ids: set[int]) -> dict[int, tuple[str | None, str | None]]:
    m = Member.__table__
    out: dict[int, tuple[str | None, str | None]] = {}
    for part in _chunks(sorted(member_ids)):
        for mid, email, phone in conn.execute(sa.select(m.c.id, m.c.email, m.c.phone).where(_in(conn, m.c.id, part))):
            out[mid] = (email, phone)
    return out


def _apply_effects(conn: Connection, events: list[EngagementEvent], members: list[int | None],
                   by_address: dict, result: IngestResult) -> None:
    # Suppressing needs an address; when the event has none (e.g. a Twilio callback without "To"), use the
    # resolved member's current one.
    need_contact = {m for e, m in zip(events, members, strict=True) if m is not None and not e.recipient}
    fx = _Effects(_addresses_of(conn, need_contact) if need_contact else {}, by_address)

    for e, member in zip(events, members, strict=True):
        reason = _suppression_reason(e)
        addr = fx.address(e, member) if reason is not None else None
        if reason is not None and addr:
            fx.suppress[(e.channel.value, address_hash(e.channel, addr))] = (reason, f"{e.provider}:{e.kind.value}")

        # The event kind -> consent effect table. LINE's follow / unfollow arrive as resubscribed /
        # unsubscribed and its opt-out keywords as inbound STOP, each recorded with its own source.
        line = e.channel is Channel.LINE
        if e.kind is EventKind.COMPLAINED:
            fx.opt_out(e, member, Channel.EMAIL, ConsentSource.COMPLAINT)
        elif e.kind is EventKind.UNSUBSCRIBED:
            fx.opt_out(e, member, e.channel, _LINE_SOURCES[e.kind] if line else ConsentSource.UNSUBSCRIBE_LINK)
        elif e.kind is EventKind.RESUBSCRIBED:
            fx.opt_in(e, member, e.channel, _LINE_SOURCES[e.kind] if line else ConsentSource.PREFERENCE_CENTER)
        elif e.kind is EventKind.INBOUND and e.command is InboundCommand.STOP:
            fx.opt_out(e, member, e.channel if line else Channel.SMS,
                       ConsentSource.LINE_STOP if line else ConsentSource.SMS_STOP)
        elif e.kind is EventKind.INBOUND and e.command is InboundCommand.START and not line:
            fx.opt_in(e, member, Channel.SMS, ConsentSource.SMS_START)
        elif e.kind is EventKind.REJECTED and e.channel is Channel.SMS and e.reason == REASON_OPTED_OUT:
            fx.opt_out(e, member, Channel.SMS, ConsentSource.SMS_STOP)
        elif e.kind is EventKind.FAILED and e.channel is Channel.PUSH and e.reason == REASON_UNREGISTERED:
            if e.recipient:
                fx.dead_tokens[e.recipient] = min(e.occurred_at, fx.dead_tokens.get(e.recipient, e.occurred_at))

    if fx.consents:
        result.consent_changes += record_consents(conn, fx.consents)
    _write_suppressions(conn, fx.suppress, fx.lift, result)
    if fx.dead_tokens:
        _invalidate_tokens(conn, fx.dead_tokens, result)


_LINE_SOURCES = {EventKind.UNSUBSCRIBED: ConsentSource.LINE_UNFOLLOW, EventKind.RESUBSCRIBED: ConsentSource.LINE_FOLLOW}


class _Effects:
    """What one batch of events changes: consent statements, suppressions to add and to lift, dead tokens."""

    def __init__(self, contacts: dict[int, tuple[str | None, str | None]], by_address: dict):
        self.contacts, self.by_address = contacts, by_address
        self.suppress: dict[tuple[str, str], tuple[str, str]] = {}  # (channel, hash) -> (reason, source)
        self.lift: set[tuple[str, str]] = set()  # (channel, hash) unsubscribe suppressions to lift
        self.consents: list[ConsentStatement] = []
        self.dead_tokens: dict[str, datetime] = {}

    def address(self, e: EngagementEvent, member: int | None) -> str | None:
        if e.recipient:
            return normalise_recipient(e.channel, e.recipient)
        if member is not None and member in self.contacts and e.channel in (Channel.EMAIL, Channel.SMS):
            email, phone = self.contacts[member]
            return normalise_recipient(e.channel, email if e.channel == Channel.EMAIL else phone)
        return None

    def members_for(self, e: EngagementEvent, member: int | None) -> list[int]:
        if member is not None:
            return [member]
        return list(self.by_address.get((e.channel.value, normalise_recipient(e.channel, e.recipient) or ""), []))

    def opt_out(self, e: EngagementEvent, member: int | None, channel: Channel, source: ConsentSource) -> None:
        targets = self.members_for(e, member)
        for m in targets:
            self.consents.append(_consent(m, channel, False, source, e))
        addr = self.address(e, member)
        if not targets and addr:
            self.suppress.setdefault((channel.value, address_hash(channel, addr)),
                                     (SuppressionReason.UNSUBSCRIBE.value, f"{e.provider}:{e.kind.value}"))

    def opt_in(self, e: EngagementEvent, member: int | None, channel: Channel, source: ConsentSource) -> None:
        for m in self.members_for(e, member):
            self.consents.append(_consent(m, channel, True, source, e))
        addr = self.address(e, member)
        if addr:
            self.lift.add((channel.value, address_hash(channel, addr)))


def _suppression_reason(e: EngagementEvent) -> str | None:
    """Why the event's address goes on the suppression list (the parser's own verdict first), or None."""
    if e.suppress is not None:
        return e.suppress
    if e.kind is EventKind.BOUNCED and e.bounce_class is BounceClass.HARD:
        return SuppressionReason.HARD_BOUNCE.value
    if e.kind is EventKind.COMPLAINED:
        return SuppressionReason.COMPLAINT.value
    return None


def _write_suppressions(conn: Connection, suppress: dict[tuple[str, str], tuple[str, str]],
                        lift: set[tuple[str, str]], result: IngestResult) -> None:
    """Lift the unsubscribe suppressions that a resubscription ends (unless the same batch unsubscribes
    again), then add the new suppressions (an existing one for the address is kept)."""
    s = Suppression.__table__
    lift -= {k for k, (r, _) in suppress.items() if r == SuppressionReason.UNSUBSCRIBE.value}
    for channel, digest in sorted(lift):
        conn.execute(sa.delete(s).where(s.c.channel == channel, s.c.address_hash == digest,
                                        s.c.reason == SuppressionReason.UNSUBSCRIBE.value))
    if suppress:
        now = utcnow()
        ins = insert_for(conn, s).on_conflict_do_nothing(index_elements=["channel", "address_hash"])
        rows = [dict(channel=c, address_hash=h, member_id=None, reason=r, source=src[:64], created_at=now)
                for (c, h), (r, src) in sorted(suppress.items())]
        result.suppressed += len(conn.execute(ins.returning(s.c.id), rows).all())


def _invalidate_tokens(conn: Connection, dead_tokens: dict[str, datetime], result: IngestResult) -> None:
    """Mark the push tokens FCM reported unregistered as invalid, from the earliest report."""
    d = Device.__table__
    for token, when in sorted(dead_tokens.items()):
        done = conn.execute(
            sa.update(d).where(d.c.token == token, d.c.invalidated_at.is_(None))
            .values(invalidated_at=when, invalid_reason=REASON_UNREGISTERED)
        )
        result.devices_invalidated += done.rowcount or 0
