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


# -- requests-based transports (Twilio, FCM, pooled SendGrid) -------------------------------------------


def transport_failure(exc: BaseException) -> TransientFailure:
    """The :class:`TransientFailure` for a ``requests`` exception, ``ambiguous`` when the request may
    have reached the provider.

    Not ambiguous: connect timeouts and errors establishing the connection (refused, DNS, TLS handshake):
    nothing was sent. Ambiguous: a read timeout, and a connection that broke after the request was
    written (urllib3 ``ProtocolError``: ``RemoteDisconnected``, a reset while reading the answer, a
    torn chunked body). With retries off, urllib3 re-raises read-side errors as they are and wraps
    connect-side errors in ``MaxRetryError``, which is what tells the two apart. Shared by the FCM adapter,
    which sees the same ``requests`` exceptions as the ``cause`` of firebase-admin's errors.
    """
    import requests
    from urllib3.exceptions import ProtocolError

    name = type(exc).__name__
    if isinstance(exc, requests.ConnectTimeout):
        return TransientFailure(reason=f"connect timeout: {name}")
    if isinstance(exc, requests.Timeout):  # ReadTimeout: the request was sent, the answer did not come
        return TransientFailure(reason=f"read timeout after sending: {name}", ambiguous=True)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return TransientFailure(reason=f"answer torn after sending: {name}", ambiguous=True)
    if isinstance(exc, requests.ConnectionError):
        inner = exc.args[0] if exc.args else None
        if isinstance(inner, ProtocolError) or isinstance(getattr(inner, "reason", None), ProtocolError):
            return TransientFailure(reason=f"connection lost after sending: {_cause_name(inner)}", ambiguous=True)
        return TransientFailure(reason=f"connection error before sending: {_cause_name(inner) or name}")
    # Anything else from requests (invalid URL, too many redirects...) happened around, not inside, the send.
    return TransientFailure(reason=f"request error: {name}")


def resolve_environment_once(session, url: str) -> None:
    """Read the proxy and CA-bundle environment for ``url`` once instead of on every request.

    A ``requests`` session with ``trust_env`` re-reads the whole process environment (proxies, no_proxy,
    CA bundle) for every request: about 0.1 ms of CPU per message, a tenth of an adapter's cost. The
    environment does not change while a dispatcher runs, so we resolve it at start-up and pin it on the
    session: ``HTTPS_PROXY``/``NO_PROXY`` and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` keep working,
    read when the adapter is built. (``.netrc`` credentials are not used: every request carries its own.)
    """
    import os

    from requests.utils import get_environ_proxies

    session.proxies.update(get_environ_proxies(url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle and session.verify is True:
        session.verify = bundle
    session.trust_env = False


def _cause_name(error) -> str:
    """``RemoteDisconnected`` from ``ProtocolError('Connection aborted.', RemoteDisconnected(...))``."""
    if error is None:
        return ""
    reason = getattr(error, "reason", None)
    if reason is not None and reason is not error:
        return _cause_name(reason)
    args = getattr(error, "args", ())
    if len(args) > 1 and isinstance(args[1], BaseException):
        return type(args[1]).__name__
    return type(error).__name__
