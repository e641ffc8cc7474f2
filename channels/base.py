"""The channel-adapter contract, re-exported for adapter authors, plus what all adapters share.

The contract itself lives in :mod:`membercare.delivery.contract` (the delivery engine depends on it
and must stay importable without the provider SDKs); this module re-exports it so an adapter only
imports from ``channels.base``, and adds the small helpers every adapter needs: the names under which
our ids travel inside provider requests, ``Retry-After`` parsing and a secret-free ``require`` for
configuration.

Our ids in provider requests (engagement maps back through them, see docs/channels.md):

* SendGrid: ``custom_args`` ``{MESSAGE_ID_ARG: ..., IDEMPOTENCY_KEY_ARG: ...}`` (SendGrid copies them to
  the top level of every event it posts back).
* Twilio: the ``StatusCallback`` URL query ``?mid=<message id>&ik=<idempotency key>``.
* FCM: the ``data`` payload ``{MESSAGE_ID_ARG: ..., IDEMPOTENCY_KEY_ARG: ...}``.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping

from membercare.delivery.contract import (
    Accepted,
    ChannelAdapter,
    Content,
    EmailContent,
    FailureReason,
    OutboundMessage,
    PermanentFailure,
    PushContent,
    SendResult,
    SmsContent,
    TransientFailure,
    redact,
)
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose

MESSAGE_ID_ARG = "membercare_message_id"
IDEMPOTENCY_KEY_ARG = "membercare_idempotency_key"
# Query parameters of the Twilio status-callback URL (kept short: Twilio signs the full URL).
CALLBACK_MESSAGE_ID_PARAM = "mid"
CALLBACK_IDEMPOTENCY_KEY_PARAM = "ik"

DEFAULT_TIMEOUT_S = 10.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date (RFC 9110 10.2.3).

    Returns ``None`` for a missing or unparsable header, never a negative number.
    """
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def require(env: Mapping[str, str], name: str, *, why: str = "") -> str:
    """The value of environment variable ``name`` or a ``ConfigurationError`` naming it (never the value)."""
    value = (env.get(name) or "").strip()
    if not value:
        raise ConfigurationError(f"{name} is not set{': ' + why if why else ''}")
    return value


def optional(env: Mapping[str, str], name: str) -> str | None:
    value = (env.get(name) or "").strip()
    return value or None


def normalise_base_url(url: str | None, variable: str) -> str | None:
    """Strip a trailing slash and check that a base URL has a scheme and host."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"{variable} must be an http(s) URL with a host, e.g. http://127.0.0.1:8025")
    return url


__all__ = [
    "Accepted",
    "CALLBACK_IDEMPOTENCY_KEY_PARAM",
    "CALLBACK_MESSAGE_ID_PARAM",
    "Channel",
    "ChannelAdapter",
    "ConfigurationError",
    "Content",
    "DEFAULT_TIMEOUT_S",
    "EmailContent",
    "FailureReason",
    "IDEMPOTENCY_KEY_ARG",
    "MESSAGE_ID_ARG",
    "OutboundMessage",
    "PermanentFailure",
    "Purpose",
    "PushContent",
    "SendResult",
    "SmsContent",
    "TransientFailure",
    "normalise_base_url",
    "optional",
    "parse_retry_after",
    "redact",
    "require",
]
