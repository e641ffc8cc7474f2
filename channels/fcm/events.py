"""App-reported push tracking -> :class:`membercare.engagement.events.EngagementEvent`.

FCM tells the sender nothing about display or taps, so the shop's app reports them to
``POST /track/push`` (signature scheme: ``channels/fcm/webhooks.py``). The body is one report or a
JSON array of reports (an app that was offline flushes its queue in one request)::

    {"event_id": "9b2f...",               # optional but recommended: unique per report
     "message_id": "...",                 # our id, from the FCM data key ``membercare_message_id``
     "event": "received" | "opened" | "dismissed" | "unregistered",
     "occurred_at": "2026-11-23T12:00:00Z",  # or "timestamp": ISO 8601 or Unix seconds
     "token": "...",                      # optional: the device's FCM token
     "platform": "android" | "ios" | "web"}

``unregistered`` is the app telling us that its previous token is dead (the OS rotated or revoked it);
it invalidates that device. Without ``event_id`` the dedupe key is a hash of
``message_id + event + occurred_at`` (plus the token when there is no message id), so a resent report
is stored once either way.

The receiver takes a batch report by report (:func:`parse_push_reports`): a report with no event, no
usable id (``message_id``/``token``/``event_id`` with a control character such as NUL, or too long) or a
bad time is refused on its own, with its index and the reason, and the valid reports beside it are stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from membercare.engagement.events import (
    REASON_UNREGISTERED,
    EngagementEvent,
    EventKind,
    MalformedPayload,
    Provider,
    clip,
    has_control,
    loads_json,
    stable_key,
    usable_id,
)
from membercare.models import Channel
from membercare.timeutil import UTC

_KINDS = {
    "received": EventKind.PUSH_RECEIVED,
    "delivered": EventKind.PUSH_RECEIVED,
    "opened": EventKind.PUSH_OPENED,
    "dismissed": EventKind.PUSH_DISMISSED,
    "unregistered": EventKind.FAILED,
}
MAX_REPORTS_PER_REQUEST = 1000
_MAX_MESSAGE_ID = 32  # our message ids (outbox_messages.message_id)
_MAX_TOKEN = 4096  # FCM registration tokens are a few hundred characters


def _usable_or_refused(item: Mapping, name: str, max_len: int) -> str | None:
    """The id ``item[name]``, ``None`` when absent or empty; :class:`MalformedPayload` when it cannot be one."""
    value = item.get(name)
    if value is None or value == "":
        return None
    if usable_id(value, max_len) is None:
        raise MalformedPayload(f"{name} is not a usable id (a string of at most {max_len} characters without "
                               "control characters)")
    return value


def parse_time(value: Any) -> datetime:
    """ISO 8601 (with an offset or ``Z``) or Unix seconds/milliseconds -> aware UTC."""
    if isinstance(value, bool) or value is None:
        raise MalformedPayload("occurred_at is missing")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds > 1e11:  # JavaScript's Date.now() is in milliseconds
            seconds /= 1000.0
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise MalformedPayload("occurred_at is out of range") from None
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise MalformedPayload("occurred_at is not ISO 8601") from None
        if dt.tzinfo is None:
            raise MalformedPayload("occurred_at needs a UTC offset")
        return dt.astimezone(UTC)
    raise MalformedPayload("occurred_at has the wrong type")


@dataclass(frozen=True)
class RejectedReport:
    """A report of a request that was refused on its own (the others of the request are stored)."""

    index: int  # position in the request's array (0 for a single report)
    error: str


def parse_push_reports(body: bytes) -> tuple[list[tuple[int, EngagementEvent]], list[RejectedReport]]:
    """Parse the raw body report by report: ``([(index, event)], [rejected])``.

    Raises :class:`MalformedPayload` only when the body as a whole is unusable (not JSON, too deeply nested,
    neither a report nor a list of them, empty, too many reports). A report that is wrong on its own (no
    event, no usable id, a bad time) is rejected with its index and the reason, and the valid reports
    beside it are kept: the app can drop exactly the ones that will never be accepted.
    """
    data = loads_json(body)
    items = data if isinstance(data, list) else [data]
    if not items:
        raise MalformedPayload("no reports")
    if len(items) > MAX_REPORTS_PER_REQUEST:
        raise MalformedPayload(f"at most {MAX_REPORTS_PER_REQUEST} reports per request")
    events: list[tuple[int, EngagementEvent]] = []
    rejected: list[RejectedReport] = []
    for i, item in enumerate(items):
        try:
            events.append((i, parse_push_report(item)))
        except MalformedPayload as exc:
            rejected.append(RejectedReport(i, str(exc)))
    return events, rejected


def parse_push_body(body: bytes) -> list[EngagementEvent]:
    """Parse the raw body, all or nothing: raises :class:`MalformedPayload` for anything but a report or a
    list of valid reports (the receiver uses :func:`parse_push_reports`, which keeps the valid ones)."""
    events, rejected = parse_push_reports(body)
    if rejected:
        first = rejected[0]
        raise MalformedPayload(first.error if not events and len(rejected) == 1
                               else f"report {first.index}: {first.error}")
    return [event for _, event in events]


def parse_push_report(item: Any) -> EngagementEvent:
    if not isinstance(item, Mapping):
        raise MalformedPayload("a push report is a JSON object")
    name = item.get("event")
    if not isinstance(name, str) or not name:
        raise MalformedPayload("event is missing")
    kind = _KINDS.get(name.lower(), EventKind.UNKNOWN)
    occurred = parse_time(item.get("occurred_at", item.get("timestamp")))
    # The app echoes ids we gave it: one with a control character or of the wrong length is a broken app,
    # refused with the reason instead of being cleaned into an id that could belong to another message.
    mid = _usable_or_refused(item, "message_id", _MAX_MESSAGE_ID)
    token = _usable_or_refused(item, "token", _MAX_TOKEN)
    if mid is None and token is None:
        raise MalformedPayload("a push report needs message_id or token")
    event_id = item.get("event_id")
    if isinstance(event_id, str) and has_control(event_id):
        raise MalformedPayload("event_id contains control characters")
    if isinstance(event_id, str) and event_id and len(event_id) <= 120:
        dedupe = f"ev:{event_id}"
    else:
        dedupe = stable_key(mid, name.lower(), occurred.isoformat(), token if mid is None else None)
    reason = None
    if kind is EventKind.FAILED:
        reason = REASON_UNREGISTERED
    elif kind is EventKind.UNKNOWN:
        reason = clip(f"unmapped push event {name!r}", 500)
    # The raw payload is kept, but never the device token (it is a credential to message that device).
    raw = {k: v for k, v in item.items() if k != "token"}
    if token:
        raw["token_hint"] = f"{token[:4]}***({len(token)})"
    return EngagementEvent(
        provider=Provider.APP,
        dedupe_key=dedupe,
        kind=kind,
        channel=Channel.PUSH,
        occurred_at=occurred,
        raw=raw,
        message_id=mid,
        reason=reason,
        recipient=token,
    )
