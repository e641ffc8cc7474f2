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
``accountLink``     ``unknown`` with the reason ``accountLink ok`` / ``accountLink failed``; the receiver
                    then spends ``link.nonce`` and links the user id (:func:`account_link`,
                    :mod:`membercare.receiver.line_link`)
anything else       ``unknown`` (``join``, ``beacon``, ...), the raw event kept
==================  =====================================================================================

A follower asks to link their member account by writing one of :data:`LINK_KEYWORDS` (綁定, "link"), or by
following the account while no member has their user id (:func:`link_request`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
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
LINK_KEYWORDS = frozenset({"綁定", "綁定帳號", "帳號綁定", "連結帳號", "link", "link account"})
ACCOUNT_LINK = "accountLink"
MAX_NONCE = 255  # LINE: a nonce is 10 to 255 characters
_TRIM = " \t\r\n.!?。！？,，;；:：'\"“”「」"
_KINDS = {"follow": EventKind.RESUBSCRIBED, "unfollow": EventKind.UNSUBSCRIBED, "message": EventKind.INBOUND,
          "postback": EventKind.CLICKED}
UNSUBSCRIBE_SUPPRESSION = "unsubscribe"  # membercare.delivery.models.SuppressionReason.UNSUBSCRIBE


def _keyword(text: str | None) -> str:
    return unicodedata.normalize("NFKC", text or "").strip(_TRIM).casefold()


def is_stop_keyword(text: str | None) -> bool:
    """Whether a member's message is an opt-out: the whole text (NFKC, trimmed, case-folded) is a keyword."""
    return _keyword(text) in STOP_KEYWORDS


def is_link_keyword(text: str | None) -> bool:
    """Whether a follower's message asks to link their member account (the whole text is a keyword)."""
    return _keyword(text) in LINK_KEYWORDS


@dataclass(frozen=True)
class AccountLink:
    """An ``accountLink`` event: the LINE user, whether LINE linked (``ok``), and our nonce."""

    user_id: str | None
    nonce: str | None
    ok: bool


@dataclass(frozen=True)
class LinkRequest:
    """A follower to send the login link to: their user id, the event's reply token, and why."""

    user_id: str
    reply_token: str | None
    reason: str  # "keyword" or "follow"


def _user_id(event: Mapping[str, Any]) -> str | None:
    source = event.get("source")
    user = source.get("userId") if isinstance(source, dict) else None
    return usable_id(user, 64) if isinstance(user, str) else None


def account_link(event: Mapping[str, Any]) -> AccountLink | None:
    """The account link an event reports, or ``None`` when it is not an ``accountLink`` event."""
    if event.get("type") != ACCOUNT_LINK:
        return None
    link: Mapping[str, Any] = event["link"] if isinstance(event.get("link"), dict) else {}
    nonce = link.get("nonce") if isinstance(link.get("nonce"), str) else None
    return AccountLink(user_id=_user_id(event), nonce=usable_id(nonce, MAX_NONCE) if nonce else None,
                       ok=link.get("result") == "ok")


def link_request(event: Mapping[str, Any], linked: bool) -> LinkRequest | None:
    """The follower to prompt with the login link: one who wrote a link keyword, or who followed while
    not ``linked`` to a member. ``None`` for anything else and for a redelivered event (it was answered)."""
    user = _user_id(event)
    context = event.get("deliveryContext")
    if user is None or (isinstance(context, dict) and context.get("isRedelivery") is True):
        return None
    token = event.get("replyToken") if isinstance(event.get("replyToken"), str) else None
    message: Mapping[str, Any] = event["message"] if isinstance(event.get("message"), dict) else {}
    if event.get("type") == "message" and message.get("type") == "text" and is_link_keyword(message.get("text")):
        return LinkRequest(user, token, "keyword")
    if event.get("type") == "follow" and not linked:
        return LinkRequest(user, token, "follow")
    return None


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
    elif kind_name == ACCOUNT_LINK:
        link = account_link(event)
        reason = f"accountLink {'ok' if link and link.ok else 'failed'}"
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
