"""Member events in: our own shape and the Segment/RudderStack ``track`` call, stored once by event id.

Our shape (one object, a list, or ``{"events": [...]}``)::

    {"id": "ev-123", "name": "cart.updated", "member": "M0000042", "at": "2026-11-23T10:00:00Z",
     "properties": {"items": 2, "value_minor": 129000}}

The ``track`` call (one call, a list, or ``{"batch": [...]}``; other call types such as ``identify`` are
skipped)::

    {"type": "track", "event": "Order Completed", "userId": "M0000042", "messageId": "...",
     "timestamp": "2026-11-23T10:00:00Z", "properties": {...}}

``userId`` is the member's external id. Event names are normalised: the e-commerce spec's names map to ours
(``Order Completed`` -> ``order.placed``, ``Product Added`` / ``Cart Viewed`` -> ``cart.updated``, ...),
any other name becomes lower case with ``_`` for spaces. Storing is ``INSERT ... ON CONFLICT (event_id) DO
NOTHING``: a retried delivery stores nothing new and starts nothing again. Each newly stored event enters its
member into the journeys that start on it and wakes the member's instances waiting for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.sqlutil import insert_returning
from membercare.engagement.events import MalformedPayload, usable_id
from membercare.journeys.definition import Journey
from membercare.journeys.entry import enter, wake_waiting
from membercare.journeys.models import MemberEvent
from membercare.models import Member
from membercare.timeutil import ensure_utc

MAX_EVENTS = 1000  # per request or per import chunk
MAX_ID = 128
# The Segment/RudderStack e-commerce spec's event names that have a name of ours.
TRACK_NAMES = {
    "order completed": "order.placed", "order placed": "order.placed", "order refunded": "order.refunded",
    "order cancelled": "order.cancelled", "product added": "cart.updated", "product removed": "cart.updated",
    "cart viewed": "cart.updated", "checkout started": "checkout.started", "product viewed": "product.viewed",
    "product reviewed": "review.written", "signed up": "member.joined",
}
_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")


@dataclass(frozen=True)
class EventIn:
    """One event as received: the member by external id (or database id), nothing else about them."""

    event_id: str
    name: str
    member: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)
    source: str = "api"


@dataclass
class IngestReport:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    unknown_members: int = 0
    skipped: int = 0  # calls that are not events (identify, page, ...)
    entered: int = 0
    woken: int = 0

    def add(self, other: IngestReport) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def normalise_name(name: str) -> str:
    text = name.strip()
    mapped = TRACK_NAMES.get(text.lower())
    if mapped:
        return mapped
    out = re.sub(r"[^a-z0-9_.]+", "_", text.lower()).strip("_")
    if not _NAME.match(out):
        raise MalformedPayload("an event name must start with a letter and have at most 64 characters")
    return out


def _when(value: Any) -> datetime:
    if not isinstance(value, str):
        raise MalformedPayload("an event's time must be an ISO 8601 string")
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return ensure_utc(at)
    except ValueError:
        raise MalformedPayload("an event's time must be an ISO 8601 instant with its offset") from None


def _text(value: Any, what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    out = usable_id(value, MAX_ID)
    if out is None:
        raise MalformedPayload(f"{what} must be a string of at most {MAX_ID} characters without control characters")
    return out


def _one(item: Any, now: datetime, source: str) -> EventIn | None:
    if not isinstance(item, dict):
        raise MalformedPayload("each event must be a JSON object")
    props = item.get("properties") or {}
    if not isinstance(props, dict):
        raise MalformedPayload("properties must be a JSON object")
    if "type" in item:  # a Segment/RudderStack call
        if item["type"] != "track":
            return None
        return EventIn(_text(item.get("messageId"), "messageId"), normalise_name(_text(item.get("event"), "event")),
                       _text(item.get("userId"), "userId"),
                       _when(item["timestamp"]) if item.get("timestamp") else now, props, source)
    return EventIn(_text(item.get("id"), "id"), normalise_name(_text(item.get("name"), "name")),
                   _text(item.get("member"), "member"), _when(item["at"]) if item.get("at") else now, props, source)


def parse_events(data: Any, now: datetime, *, source: str = "api") -> tuple[list[EventIn], int]:
    """Events of a request body (already JSON-decoded) and the number of calls skipped as not events."""
    if isinstance(data, dict):
        items = data.get("events", data.get("batch", [data]))
    else:
        items = data
    if not isinstance(items, list):
        raise MalformedPayload("expected an event, a list of events, {\"events\": [...]} or {\"batch\": [...]}")
    if len(items) > MAX_EVENTS:
        raise MalformedPayload(f"at most {MAX_EVENTS} events per request")
    out = [_one(x, now, source) for x in items]
    return [e for e in out if e is not None], sum(1 for e in out if e is None)


def _member_ids(conn: Connection, refs: Iterable[str]) -> dict[str, int]:
    m = Member.__table__
    refs = set(refs)
    found = dict(conn.execute(sa.select(m.c.external_id, m.c.id).where(m.c.external_id.in_(sorted(refs))))
                 .tuples().all())
    digits = [int(r) for r in refs - set(found) if r.isdigit() and len(r) < 19]
    if digits:
        found.update({str(i): i for i in conn.execute(sa.select(m.c.id).where(m.c.id.in_(digits))).scalars()})
    return found


def ingest(conn: Connection, events: Sequence[EventIn], journeys: Sequence[Journey], now: datetime) -> IngestReport:
    """Store the events once (by event id) and, for each newly stored one, start journeys and wake waits."""
    rep = IngestReport(received=len(events))
    ids = _member_ids(conn, (e.member for e in events))
    rows, by_id = [], {}
    for e in events:
        mid = ids.get(e.member)
        if mid is None:
            rep.unknown_members += 1
            continue
        if e.event_id in by_id:
            rep.duplicates += 1
            continue
        by_id[e.event_id] = (e, mid)
        rows.append(dict(event_id=e.event_id, name=e.name, member_id=mid, occurred_at=e.occurred_at, received_at=now,
                         source=e.source, properties=json.dumps(e.properties, ensure_ascii=False, default=str)))
    stored = set(insert_returning(conn, MemberEvent.__table__, rows, conflict=["event_id"], returning="event_id"))
    rep.stored = len(stored)
    rep.duplicates += len(rows) - len(stored)
    starts: dict[str, list[Journey]] = {}
    for j in journeys:
        if j.entry.event:
            starts.setdefault(j.entry.event, []).append(j)
    for event_id in sorted(stored):
        e, mid = by_id[event_id]
        for j in starts.get(e.name, ()):
            if enter(conn, j, mid, entry_key=f"ev:{event_id}", at=e.occurred_at,
                     context={"event": e.name, **e.properties}) is not None:
                rep.entered += 1
        rep.woken += wake_waiting(conn, mid, [e.name], now)
    return rep


def read_file(path: Path, now: datetime) -> Iterable[list[EventIn]]:
    """Events of a file (JSON lines, or one JSON document in either shape), in chunks of ``MAX_EVENTS``."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n{" not in stripped.rstrip()):
        docs: list[Any] = [json.loads(text)]
    else:
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    items: list[Any] = []
    for d in docs:
        part = d.get("events", d.get("batch", [d])) if isinstance(d, dict) else d
        items.extend(part if isinstance(part, list) else [part])
    for i in range(0, len(items), MAX_EVENTS):
        yield parse_events(items[i:i + MAX_EVENTS], now, source="import")[0]


__all__ = ["MAX_EVENTS", "TRACK_NAMES", "EventIn", "IngestReport", "ingest", "normalise_name", "parse_events",
           "read_file"]
