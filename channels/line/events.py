"""LINE webhook events -> :class:`membercare.engagement.events.EngagementEvent`.

A webhook body is ``{"destination": <bot user id>, "events": [...]}``; each event has ``type``,
``timestamp`` (ms), ``source`` (``{"type": "user", "userId": "U..."}``), ``webhookEventId`` (unique per
event, kept when LINE redelivers it) and ``deliveryContext.isRedelivery``. The dedupe key is the
``webhookEventId``, so a redelivered event is stored once.

==================  =====================================================================================
LINE ``type``       kind
==================  =====================================================================================
``follow``          ``resubscribed``: the user added the account as a friend or unblocked it (LINE
                    marketing consent granted, an ``unsubscribe`` suppression of the user id lifted)
``unfollow``        ``unsubscribed``: the user blocked the account (consent revoked, and the user id
                    suppressed: nothing more reaches them on LINE, transactional messages included)
``message``         ``inbound``; a text that is an opt-out keyword (the whole message, trimmed, case-
                    insensitive: 取消, 退訂, 取消訂閱, STOP, UNSUBSCRIBE) has ``command`` ``stop``
``postback``        ``clicked``: the user tapped a postback action of our Flex message; its ``data``
                    carries our message id (``mid=<message id>``)
anything else       ``unknown`` (``accountLink``, ``join``, ``beacon``, ...), the raw event kept
==================  =====================================================================================
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from membercare.engagement.events import (
    EngagementEvent,
    EventKind,
    InboundCommand,
    MalformedPayload,
    clip,
    payload_key,
    usable_id,
)
from membercare.models import Channel
from membercare.timeutil import utcnow

PROVIDER = "line"
POSTBACK_MESSAGE_ID = "mid"  # our message id in a postback action's data: "mid=<message id>&..."
STOP_KEYWORDS = frozenset({"取消", "退訂", "取消訂閱", "stop", "unsubscribe"})
_TRIM = " \t\r\n.!?。！？,，;；:：'\"“”「」"
_KINDS = {"follow": EventKind.RESUBSCRIBED, "unfollow": EventKind.UNSUBSCRIBED, "message": EventKind.INBOUND,
          "postback": EventKind.CLICKED}
UNSUBSCRIBE_SUPPRESSION = "unsubscribe"  # membercare.delivery.models.SuppressionReason.UNSUBSCRIBE


def is_stop_keyword(text: str | None) -> bool:
    """Whether a member's message is an opt-out: the whole text (NFKC, trimmed, case-folded) is a keyword."""
    return unicodedata.normalize("NFKC", text or "").strip(_TRIM).casefold() in STOP_KEYWORDS


def _occurred(event: Mapping[str, Any]) -> datetime:
    ts = event.get("timestamp")
    if isinstance(ts, int) and not isinstance(ts, bool) and 0 < ts < 10**14:
        return datetime.fromtimestamp(ts / 1000, UTC)
    return utcnow()


def _postback_message_id(event: Mapping[str, Any]) -> str | None:
    postback = event.get("postback")
    data = postback.get("data") if isinstance(postback, dict) else None
    if not isinstance(data, str):
        return None
    values = parse_qs(data, max_num_fields=20).get(POSTBACK_MESSAGE_ID)
    return usable_id(values[0], 32) if values else None


def parse_event(event: Any) -> EngagementEvent:
    """One event of a LINE webhook body; :class:`MalformedPayload` when it is not an object with a type."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not event["type"]:
        raise MalformedPayload("a LINE event must be an object with a type")
    kind_name = event["type"]
    kind = _KINDS.get(kind_name, EventKind.UNKNOWN)
    source: dict[str, Any] = event["source"] if isinstance(event.get("source"), dict) else {}
    user_id = source.get("userId") if isinstance(source.get("userId"), str) else None
    event_id = event.get("webhookEventId")
    key = f"ev:{event_id}" if isinstance(event_id, str) and usable_id(event_id, 100) else payload_key(event)
    command = reason = message_id = suppress = None
    if kind is EventKind.INBOUND:
        message: dict[str, Any] = event["message"] if isinstance(event.get("message"), dict) else {}
        if message.get("type") == "text" and is_stop_keyword(message.get("text")):
            command = InboundCommand.STOP
            reason = command.value
    elif kind is EventKind.CLICKED:
        message_id = _postback_message_id(event)
        reason = clip("postback", 500)
    elif kind is EventKind.UNSUBSCRIBED:
        suppress = UNSUBSCRIBE_SUPPRESSION if user_id else None
    elif kind is EventKind.UNKNOWN:
        reason = clip(f"unmapped LINE event type {kind_name!r}", 500)
    return EngagementEvent(provider=PROVIDER, dedupe_key=key, kind=kind, channel=Channel.LINE,
                           occurred_at=_occurred(event), raw=event, message_id=message_id, reason=reason,
                           recipient=user_id, command=command, suppress=suppress)


def parse_body(payload: Any) -> tuple[list[EngagementEvent], list[tuple[int, str]], list[int]]:
    """The events of a webhook body, the ones refused on their own ``(index, error)``, and the request
    index of each event kept. :class:`MalformedPayload` when the body is not LINE's shape at all."""
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise MalformedPayload("a LINE webhook body is an object with an events list")
    events: list[EngagementEvent] = []
    rejected: list[tuple[int, str]] = []
    positions: list[int] = []
    for i, item in enumerate(payload["events"]):
        try:
            events.append(parse_event(item))
            positions.append(i)
        except (MalformedPayload, ValueError) as exc:
            rejected.append((i, str(exc)[:200]))
    return events, rejected, positions
