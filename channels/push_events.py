"""App-reported push tracking -> :class:`membercare.engagement.events.EngagementEvent`.

FCM tells the sender nothing about display or taps, so the shop's app reports them to
``POST /track/push`` (signature scheme: ``channels/fcm_webhooks.py``). The body is one report or a
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
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from membercare.engagement.events import (
    REASON_UNREGISTERED,
    EngagementEvent,
    EventKind,
    MalformedPayload,
    Provider,
    clip,
    loads_json,
    stable_key,
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


def parse_push_body(body: bytes) -> list[EngagementEvent]:
    """Parse the raw body. Raises :class:`MalformedPayload` for anything but a report or a list of them."""
    data = loads_json(body)
    items = data if isinstance(data, list) else [data]
    if not items:
        raise MalformedPayload("no reports")
    if len(items) > MAX_REPORTS_PER_REQUEST:
        raise MalformedPayload(f"at most {MAX_REPORTS_PER_REQUEST} reports per request")
    return [parse_push_report(item) for item in items]


def parse_push_report(item: Any) -> EngagementEvent:
    if not isinstance(item, Mapping):
        raise MalformedPayload("a push report is a JSON object")
    name = item.get("event")
    if not isinstance(name, str) or not name:
        raise MalformedPayload("event is missing")
    kind = _KINDS.get(name.lower(), EventKind.UNKNOWN)
    occurred = parse_time(item.get("occurred_at", item.get("timestamp")))
    mid = item.get("message_id")
    mid = mid if isinstance(mid, str) and mid else None
    token = item.get("token")
    token = token if isinstance(token, str) and token else None
    if mid is None and token is None:
        raise MalformedPayload("a push report needs message_id or token")
    event_id = item.get("event_id")
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
        message_id=clip(mid, 32),
        reason=reason,
        recipient=token,
    )
