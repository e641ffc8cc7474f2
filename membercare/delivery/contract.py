"""The contract between rendering, the delivery engine and the channel adapters.

Rendering produces channel *content* (:class:`EmailContent`, :class:`SmsContent`,
:class:`PushContent`, :class:`LineContent`); the delivery engine wraps it in an :class:`OutboundMessage`
with our ids and the recipient address; a :class:`ChannelAdapter` sends it and returns a typed :data:`SendResult`:

* :class:`Accepted`: the provider took the message; ``provider_message_id`` maps engagement back.
* :class:`TransientFailure`: try again later (5xx, timeout, dropped connection, 429). ``retry_after``
  is the provider's hint in seconds; ``throttled`` marks rate limiting, which the engine *defers*
  rather than counting against the error budget. ``ambiguous`` marks a failure after which the provider
  *may have accepted* the message: the request was (or may have been) fully written and then the answer
  was lost (a read timeout, a connection dropped after sending, a gateway 502/504 in front of the
  provider). Failures that happen before the request could reach the provider (connection refused, DNS,
  connect timeout, an answer of 500/503/429 from the provider itself) are *not* ambiguous. The engine
  never blindly retries an ambiguous failure of a marketing message (it becomes ``unknown`` and is
  settled from provider records or events by our message id; see ``docs/delivery.md``).
* :class:`PermanentFailure`: do not retry this address on this channel. ``reason`` is one of
  :class:`FailureReason`; ``fallback`` says whether another channel may be tried (an unregistered push
  token falls back to email; a recipient who replied STOP does not make us try another channel for
  the same marketing message unless the campaign says so).

Configuration problems (bad API key, unknown account, missing credentials) are *raised* as
:class:`membercare.errors.ConfigurationError`, never returned: they would fail every message, so
they must stop the run and never be swallowed or retried.

Adapters must be thread-safe: the dispatcher calls ``send`` from a bounded pool of worker threads.
Adapters never log full addresses, tokens or secrets; use :func:`redact`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from membercare.models import Channel, Purpose


@dataclass(frozen=True)
class EmailContent:
    subject: str
    html: str
    text: str
    preheader: str | None = None
    # Extra headers, e.g. List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) for marketing mail.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SmsContent:
    body: str
    encoding: str  # "GSM-7" or "UCS-2"
    segments: int
    # The original URLs behind the tracked short links of ``body``, by link index (see membercare.links).
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class PushContent:
    title: str
    body: str
    # FCM data payload: string keys and values only. The engine adds our message id.
    data: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LineContent:
    """A LINE push: one text message, optionally followed by one Flex message (a rich layout).

    ``flex_json`` is the Flex container (``{"type": "bubble", ...}``) as JSON text, kept as text so the
    content stays immutable and is stored byte for byte; ``alt_text`` is what LINE shows in notifications
    and chat lists for the Flex message.
    """

    text: str
    flex_json: str | None = None
    alt_text: str | None = None
    links: tuple[str, ...] = ()  # the original URLs behind the tracked short links, by link index


Content = EmailContent | SmsContent | PushContent | LineContent


@dataclass(frozen=True)
class OutboundMessage:
    """One message to one address on one channel, ready for a provider."""

    message_id: str  # our id; goes into the provider request (custom_args / callback URL / FCM data)
    idempotency_key: str  # the outbox key: campaign, occurrence, member (and coupon where relevant)
    channel: Channel
    purpose: Purpose
    to: str  # email address, E.164 phone number, push token, or LINE user id
    content: Content
    campaign: str = ""
    categories: tuple[str, ...] = ()


class FailureReason(StrEnum):
    INVALID_RECIPIENT = "invalid_recipient"
    OPTED_OUT = "opted_out"
    UNREGISTERED_TOKEN = "unregistered_token"
    REJECTED = "rejected"  # provider refused the content or the request shape
    BLOCKED = "blocked"


@dataclass(frozen=True)
class Accepted:
    provider_message_id: str
    status: int | None = None


@dataclass(frozen=True)
class TransientFailure:
    reason: str
    retry_after: float | None = None
    throttled: bool = False
    status: int | None = None
    # True when the provider may have accepted the message despite the failure (see the module docstring).
    ambiguous: bool = False


@dataclass(frozen=True)
class PermanentFailure:
    reason: FailureReason
    detail: str = ""
    fallback: bool = True
    status: int | None = None
    provider_code: str | None = None


SendResult = Accepted | TransientFailure | PermanentFailure


@runtime_checkable
class ChannelAdapter(Protocol):
    """A provider adapter for one channel. Extension point: implement ``send`` and ``close``."""

    channel: Channel

    def send(self, message: OutboundMessage) -> SendResult:
        """Send one message. Returns a typed result; raises ``ConfigurationError`` on bad credentials."""
        ...

    def close(self) -> None:
        """Release connections and pools."""
        ...


@runtime_checkable
class BatchSender(Protocol):
    """Optional capability of a :class:`ChannelAdapter`: one provider request carries one content to many
    recipients (LINE's multicast). The dispatcher uses it only for rows of one run whose rendered content
    is byte-identical (no per-member text, token or link), and only when the adapter has it.

    ``send_many(messages, batch_key)`` sends ``messages`` (1 to :attr:`max_batch` of them, one recipient
    each, all with equal ``content``, ``channel`` and ``purpose``) as one request and returns one
    :data:`SendResult` per message, in order, or ``None`` for a message the request did not carry because
    the provider refused the whole request for one recipient it does not name (nothing was sent: the
    dispatcher then sends those messages one by one with ``send``). ``batch_key`` is the dispatcher's
    deterministic key for exactly this set of rows: the adapter must derive the provider's idempotency
    key from it alone, so that the same batch sent again (a retry, or reconciliation after a crash) is
    deduplicated by the provider. Every row of the batch passed the send gate right before the call; the provider's rate
    limit counts the request once. Same rules as ``send``: thread-safe, ``ConfigurationError`` raised,
    ``ambiguous`` when the request may have been accepted.
    """

    max_batch: int

    def send_many(self, messages: Sequence[OutboundMessage], batch_key: str) -> list[SendResult | None]:
        """Send one content to every recipient of ``messages`` in one request; one result per message."""
        ...


def redact(value: str | None) -> str:
    """A log-safe form of an email address, phone number or token: keep just enough to tell them apart."""
    if not value:
        return "-"
    if "@" in value:
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@{domain}"
    if value.startswith("+"):
        return f"{value[:4]}***{value[-2:]}"
    return f"{value[:4]}***({len(value)})"
