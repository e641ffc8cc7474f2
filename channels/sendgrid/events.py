"""SendGrid Event Webhook payloads -> :class:`membercare.engagement.events.EngagementEvent`.

SendGrid posts a JSON array of event objects (up to about a thousand per request). Every object has
``email``, ``timestamp`` (Unix seconds), ``event``, ``sg_event_id`` (unique per event: our dedupe key)
and ``sg_message_id`` (``<X-Message-Id>.filter...``), plus the message's ``custom_args`` copied to the
top level: our message id arrives as ``membercare_message_id`` (``channels.base.MESSAGE_ID_ARG``).

Mapping (django-anymail's, with our bounce classes):

=====================  ===============================================================
SendGrid ``event``     kind
=====================  ===============================================================
processed              queued
dropped                rejected (``reason``: "Bounced Address", "Spam Reporting Address",
                       "Unsubscribed Address", "Invalid", ...; the first two and
                       "Invalid" also put the address on our suppression list)
delivered              delivered
deferred               deferred
bounce                 bounced: ``type`` "bounce" is hard, "blocked" is soft
open                   opened
click                  clicked (``url``)
spamreport             complained
unsubscribe            unsubscribed
group_unsubscribe      unsubscribed (``asm_group_id`` kept in the raw payload)
group_resubscribe      resubscribed
anything else          unknown (raw payload kept)
=====================  ===============================================================

An element that is not a JSON object, or has no usable timestamp, is still stored as ``unknown``
(with the receive time) rather than dropped: SendGrid would not resend it, and the raw payload is the
only record of it. For the same reason an event whose ``email``, ``membercare_message_id`` or
``sg_message_id`` holds a control character (a NUL, say) or is absurdly long is stored without that key
(``membercare.engagement.store`` drops it, and finds the member by the other key, if any) rather than
refused, and an unusable ``sg_event_id`` is hashed into the dedupe key.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from channels.base import MESSAGE_ID_ARG
from membercare.engagement.events import (
    BounceClass,
    EngagementEvent,
    EventKind,
    MalformedPayload,
    Provider,
    clip,
    loads_json,
    payload_key,
    stable_key,
    usable_id,
)
from membercare.models import Channel
from membercare.timeutil import UTC, utcnow

_KINDS: dict[str, EventKind] = {
    "processed": EventKind.QUEUED,
    "dropped": EventKind.REJECTED,
    "delivered": EventKind.DELIVERED,
    "deferred": EventKind.DEFERRED,
    "bounce": EventKind.BOUNCED,
    "open": EventKind.OPENED,
    "click": EventKind.CLICKED,
    "spamreport": EventKind.COMPLAINED,
    "unsubscribe": EventKind.UNSUBSCRIBED,
    "group_unsubscribe": EventKind.UNSUBSCRIBED,
    "group_resubscribe": EventKind.RESUBSCRIBED,
}

# SendGrid's "dropped" reasons that mean the address must never be mailed again (it is already on one of
# SendGrid's own suppression lists; mirroring it keeps our routing from choosing email for it).
_DROP_SUPPRESS = {
    "bounced address": "hard_bounce",
    "spam reporting address": "complaint",
    "invalid": "invalid",
}


def parse_sendgrid_body(body: bytes) -> list[EngagementEvent]:
    """Parse a raw Event Webhook body. Raises :class:`MalformedPayload` unless it is a JSON array."""
    data = loads_json(body)
    if not isinstance(data, list):
        raise MalformedPayload("a SendGrid Event Webhook body is a JSON array of events")
    received = utcnow()
    return [parse_sendgrid_event(item, received_at=received) for item in data]


def provider_message_id(sg_message_id: Any) -> str | None:
    """The ``X-Message-Id`` part of an ``sg_message_id`` (what the adapter stored on the outbox row)."""
    if not isinstance(sg_message_id, str) or not sg_message_id:
        return None
    head, sep, _ = sg_message_id.partition(".filter")
    if sep:
        return head[:128]
    # Current X-Message-Ids are 22 base64url characters without dots; older events append ".<host>.<n>".
    return sg_message_id.partition(".")[0][:128] or None


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        seconds = float(value)
    else:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def parse_sendgrid_event(item: Any, *, received_at: datetime | None = None) -> EngagementEvent:
    """One element of the array; never raises on an unexpected shape (it becomes ``unknown``)."""
    received_at = received_at or utcnow()
    if not isinstance(item, Mapping):
        return EngagementEvent(
            provider=Provider.SENDGRID, dedupe_key=payload_key(item), kind=EventKind.UNKNOWN,
            channel=Channel.EMAIL, occurred_at=received_at, raw={"payload": item},
            reason="event is not a JSON object",
        )
    name = item.get("event")
    kind = _KINDS.get(name, EventKind.UNKNOWN) if isinstance(name, str) else EventKind.UNKNOWN
    occurred = _timestamp(item.get("timestamp"))
    reason = None
    if occurred is None:
        occurred, kind, reason = received_at, EventKind.UNKNOWN, "missing or invalid timestamp"
    event_id = item.get("sg_event_id")
    if usable_id(event_id, 120):
        dedupe = f"sg:{event_id}"
    elif isinstance(event_id, str) and event_id:
        # Never truncate or strip an id (two ids could become one): a long one, or one with control
        # characters, is hashed whole.
        dedupe = stable_key("sg", event_id)
    else:
        dedupe = payload_key(item)

    bounce_class = None
    suppress = None
    if kind is EventKind.BOUNCED:
        # "blocked" is a reputation or content block by the receiving server: the address exists.
        bounce_class = BounceClass.SOFT if str(item.get("type", "")).lower() == "blocked" else BounceClass.HARD
    if kind in (EventKind.BOUNCED, EventKind.REJECTED, EventKind.DEFERRED):
        reason = clip(item.get("reason") or item.get("response") or item.get("status"), 500)
    if kind is EventKind.REJECTED:
        suppress = _DROP_SUPPRESS.get(str(item.get("reason", "")).strip().lower())
    if kind is EventKind.UNKNOWN and reason is None:
        reason = clip(f"unmapped SendGrid event {name!r}", 500)

    email = item.get("email")
    mid = item.get(MESSAGE_ID_ARG)
    return EngagementEvent(
        provider=Provider.SENDGRID,
        dedupe_key=dedupe,
        kind=kind,
        channel=Channel.EMAIL,
        occurred_at=occurred,
        raw=item,
        message_id=clip(mid, 32) if isinstance(mid, str) else None,
        provider_message_id=provider_message_id(item.get("sg_message_id")),
        bounce_class=bounce_class,
        url=clip(item.get("url"), 2048) if kind is EventKind.CLICKED else None,
        reason=reason,
        recipient=email if isinstance(email, str) and email else None,
        suppress=suppress,
    )
