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
``channels/sendgrid/events.py``); :func:`membercare.engagement.store.ingest` applies the effects.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from membercare.errors import InputError
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

# No provider payload comes near this (SendGrid events are 3 levels deep, app reports 2, triggers 1); the
# bound keeps json.loads, our own walks of the payload and its re-serialisation far from Python's
# recursion limit, so a hostile body gets a 400 instead of a RecursionError.
MAX_JSON_DEPTH = 32


def loads_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for webhook bodies, with the checks that keep one hostile body from costing more than a 400.

    * The body must be UTF-8 (a leading byte-order mark is tolerated); ``json.loads`` would otherwise guess
      UTF-16 or UTF-32 from the first bytes.
    * Nesting deeper than ``max_depth`` is refused before parsing (:func:`json_too_deep`).
    * ``NaN``, ``Infinity`` and numbers that overflow to infinity are refused: they are not JSON, and
      PostgreSQL's ``json`` type would refuse the re-serialised payload, failing the whole batch.
    * Lone UTF-16 surrogates (legal in JSON escapes, not encodable in UTF-8, so the database driver would
      fail on them and the provider would retry forever) are replaced by U+FFFD.

    Raises :class:`MalformedPayload` with a message that quotes no content of the body.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPayload(f"body is not UTF-8 (invalid byte at offset {exc.start})") from None
    if json_too_deep(body, max_depth):
        raise MalformedPayload(f"JSON nested deeper than {max_depth} levels")
    try:
        data = json.loads(text.removeprefix("\ufeff"), parse_constant=_not_a_number, parse_float=_finite)
    except ValueError as exc:
        raise MalformedPayload(f"not JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body):
        data = _clean(data)
    return data


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


# Escapes that can hide a quote or a backslash from a byte scan; the others (\n, \u0041, ...) never
# produce a structural character.
_QUOTING_ESCAPE = re.compile(rb'\\[\\"]')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_SCAN_CHUNK = 1 << 20


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether the JSON text ``body`` nests arrays/objects more than ``limit`` levels deep, in linear time.

    Brackets inside strings do not count. The scan never recurses and stops at the first chunk that goes too
    deep; a body that is not well-formed JSON may answer either way (``json.loads`` then says what is wrong).
    Typical webhook bodies cost about as much as ``json.loads`` itself; 16 MB of brackets about 0.1 s.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b"\\" in body:
        body = _QUOTING_ESCAPE.sub(b"", body)
    # Only quotes and brackets matter. Dropping each pair of adjacent quotes removes the strings that hold no
    # bracket (almost all of them) and merges adjacent strings, which changes nothing outside strings.
    structure = body.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    import numpy as np  # only bodies with more brackets than the limit get here

    depth, parity = 0, 0
    for start in range(0, len(structure), _SCAN_CHUNK):
        chars = np.frombuffer(structure, dtype=np.uint8, count=min(_SCAN_CHUNK, len(structure) - start),
                              offset=start)
        quote = chars == ord('"')
        # A bracket is outside strings when an even number of quotes precedes it (uint8 wraps, parity stays).
        outside = ((np.cumsum(quote, dtype=np.uint8) + parity) & 1) == 0
        parity = (parity + int(np.count_nonzero(quote))) & 1
        brackets = chars[outside & ~quote]
        if not brackets.size:
            continue
        # "[" (0x5B) and "{" (0x7B) have bit 1 set, "]" (0x5D) and "}" (0x7D) do not: +1 / -1 per bracket.
        level = np.cumsum((brackets & 2).view(np.int8) - 1, dtype=np.int64) + depth
        if int(level.max()) > limit:
            return True
        depth = int(level[-1])
    return False


# Characters that no id, address or token can contain: C0 and C1 controls, DEL, and lone surrogates
# (which only a broken escape produces). PostgreSQL text cannot hold NUL at all.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character or a lone surrogate."""
    return _CONTROL.search(text) is not None


def usable_id(value: Any, max_len: int) -> str | None:
    """``value`` when it can serve as a lookup key (an id, an address, a token), else ``None``.

    Usable means: a non-empty string of at most ``max_len`` characters without control characters. A key
    that fails is never cleaned into something else (stripping a NUL could turn it into another member's
    address); the raw payload keeps it as received.
    """
    if not isinstance(value, str) or not value or len(value) > max_len or has_control(value):
        return None
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


class MalformedPayload(InputError, ValueError):
    """The request body is not the provider's documented shape at all (the receiver answers 400)."""
