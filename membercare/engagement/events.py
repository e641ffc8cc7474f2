"""The one normalised engagement event that every provider's webhook is parsed into.

The taxonomy follows django-anymail's ``EventType`` (the best-known cross-provider vocabulary for
email tracking), extended with the push and inbound-SMS kinds that an omnichannel sender needs:

==================  ===========================================================================
kind                meaning
==================  ===========================================================================
``queued``          the provider accepted the message for sending (SendGrid ``processed``)
``sent``            handed to the next hop (Twilio ``sent``)
``delivered``       the receiving server / handset accepted it
``deferred``        temporarily refused; the provider keeps retrying
``bounced``         refused by the receiver; ``bounce_class`` is ``hard`` (address does not exist:
                    suppress it) or ``soft`` (blocked, full mailbox, carrier filtering: do not suppress)
``rejected``        the provider refused to send (on its suppression list, opted out, invalid)
``opened``          the recipient opened it (email pixel, WhatsApp read receipt)
``clicked``         the recipient followed a link; ``url`` holds it
``complained``      the recipient reported it as spam
``unsubscribed``    the recipient left through the provider (subscription link, group unsubscribe)
``resubscribed``    the recipient rejoined through the provider
``push_received``   the app displayed the notification
``push_opened``     the recipient tapped it
``push_dismissed``  the recipient swiped it away
``failed``          the send failed for another reason (``reason`` says why); a push ``failed``
                    with reason ``unregistered`` invalidates the device token
``inbound``         a message from the member (SMS reply); ``command`` is ``stop``/``start``/``help``
                    when it is an opt-out/opt-in/help keyword
``unknown``         anything we could not map; the raw payload is kept so nothing is lost
==================  ===========================================================================

An :class:`EngagementEvent` carries our message id (how engagement maps back to the outbox row,
campaign and member), the provider's ids, and the raw provider payload. ``dedupe_key`` is what makes a
retried webhook harmless: it is unique per ``provider`` in ``engagement_events``.

Extension point: a new provider needs only a parser that returns ``EngagementEvent`` objects (see
``channels/sendgrid_events.py``); :func:`membercare.engagement.store.ingest` applies the effects.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from membercare.models import Channel
from membercare.timeutil import ensure_utc


class EventKind(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    REJECTED = "rejected"
    OPENED = "opened"
    CLICKED = "clicked"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"
    RESUBSCRIBED = "resubscribed"
    PUSH_RECEIVED = "push_received"
    PUSH_OPENED = "push_opened"
    PUSH_DISMISSED = "push_dismissed"
    FAILED = "failed"
    INBOUND = "inbound"
    UNKNOWN = "unknown"


class BounceClass(StrEnum):
    HARD = "hard"
    SOFT = "soft"


class InboundCommand(StrEnum):
    """What an inbound SMS asks for, when it is one of the compliance keywords."""

    STOP = "stop"
    START = "start"
    HELP = "help"


class Provider(StrEnum):
    """Who reported an event; together with ``dedupe_key`` it identifies the event."""

    SENDGRID = "sendgrid"
    TWILIO = "twilio"
    APP = "app"  # the shop's app (push tracking)
    MEMBERCARE = "membercare"  # our own pages (one-click unsubscribe, preference centre) and the dispatcher


# Reasons with a meaning to the effect engine (other reasons are free text from the provider).
REASON_UNREGISTERED = "unregistered"
REASON_OPTED_OUT = "opted_out"


@dataclass(frozen=True, slots=True)
class EngagementEvent:
    """One thing that happened to one message (or, for inbound, one thing a member said).

    ``recipient`` is the address the event is about (email, E.164 phone number or push token). It is
    used to resolve the member and to suppress the address, and is *not* stored in its own column
    (the raw payload keeps whatever the provider sent).
    """

    provider: str
    dedupe_key: str
    kind: EventKind
    channel: Channel
    occurred_at: datetime
    raw: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    provider_message_id: str | None = None
    bounce_class: BounceClass | None = None
    url: str | None = None
    reason: str | None = None
    recipient: str | None = None
    command: InboundCommand | None = None
    # Set when the reporter already knows the member (our own pages); otherwise the store resolves it.
    member_id: int | None = None
    # The parser's verdict that ``recipient`` can never receive this channel again, as a
    # ``membercare.delivery.models.SuppressionReason`` value (e.g. SendGrid dropping a message for
    # "Bounced Address", Twilio error 21211). Hard bounces and complaints suppress without it.
    suppress: str | None = None

    def __post_init__(self) -> None:
        # Accept plain strings from callers (a dispatcher reporting a dead token) but store the enums.
        object.__setattr__(self, "kind", EventKind(self.kind))
        object.__setattr__(self, "channel", Channel(self.channel))
        if self.bounce_class is not None:
            object.__setattr__(self, "bounce_class", BounceClass(self.bounce_class))
        if self.command is not None:
            object.__setattr__(self, "command", InboundCommand(self.command))
        object.__setattr__(self, "occurred_at", ensure_utc(self.occurred_at))
        if self.kind is EventKind.BOUNCED and self.bounce_class is None:
            raise ValueError("a bounced event needs a bounce_class")
        if not self.dedupe_key:
            raise ValueError("an engagement event needs a dedupe key")


def stable_key(*parts: object) -> str:
    """A short, deterministic dedupe key from ``parts`` (for providers without an event id)."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return "h:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def payload_key(payload: Any) -> str:
    """A dedupe key for an event that has no id: the hash of its canonical JSON."""
    return stable_key(json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str))


def clip(value: Any, limit: int) -> str | None:
    """``value`` as a string of at most ``limit`` characters (provider strings are unbounded)."""
    if value is None or value == "":
        return None
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads_json(body: bytes) -> Any:
    """``json.loads`` for webhook bodies, with lone UTF-16 surrogates (legal in JSON escapes, not encodable
    in UTF-8, so the database driver would fail on them and the provider would retry forever) replaced by
    U+FFFD. Raises :class:`MalformedPayload` for anything that is not JSON."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedPayload(f"not JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body):
        data = _clean(data)
    return data


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


class MalformedPayload(ValueError):
    """The request body is not the provider's documented shape at all (the receiver answers 400)."""
