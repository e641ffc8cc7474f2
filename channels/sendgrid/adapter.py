"""Email through SendGrid's v3 Mail Send API, on the official ``sendgrid`` SDK.

Configuration (:class:`SendGridConfig`, from the environment or a Prefect Secret block):

``MEMBERCARE_SENDGRID_API_KEY``   required; the API key (never logged)
``MEMBERCARE_SENDGRID_FROM``      required; sender, ``shop@example.com`` or ``Shop Name <shop@example.com>``
``MEMBERCARE_SENDGRID_BASE_URL``  optional; unset means the real SendGrid API (set it to the sandbox)

What goes into each request: the personalisation for one recipient, our message id and idempotency
key in ``custom_args`` (SendGrid copies them into every engagement event), the message's categories,
and the content's headers (``List-Unsubscribe`` / ``List-Unsubscribe-Post`` for marketing mail).

``MEMBERCARE_SENDGRID_TRANSPORT``  optional; ``pooled`` (default) or ``sdk`` (see below)

Transport. The SDK's own transport (python_http_client on urllib) opens a new TCP (and, against the
real API, TLS) connection for every request and closes it: no keep-alive. Measured against the
sandbox on a 2-core machine that is about twice the CPU per message of a kept-alive connection and a
connect round trip added to every send. So by default (``pooled``) the adapter keeps everything the SDK
*builds* (the Mail helpers' JSON body, the SDK's URL for ``mail/send`` and its request headers:
``Authorization``, ``User-Agent: sendgrid/<version>;python``, ``Accept``) and only *sends* it over a
keep-alive pool of ``pool_size`` connections (:class:`channels.base.KeepAliveTransport`, on urllib3:
thread-safe, retries off, the delivery engine retries; a ``requests`` session on top of the same pool
cost more than twice the CPU per message). Answers are mapped exactly as the SDK's exceptions would be.
``transport="sdk"`` sends through the SDK's own client unchanged (one connection per request); each SDK
call builds its own opener, which is thread-safe without locks. The SDK has no default timeout; we set one.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr

from channels.base import (
    DEFAULT_TIMEOUT_S,
    IDEMPOTENCY_KEY_ARG,
    MESSAGE_ID_ARG,
    Accepted,
    Channel,
    ConfigurationError,
    EmailContent,
    FailureReason,
    OutboundMessage,
    PermanentFailure,
    SendResult,
    TransientFailure,
    normalise_base_url,
    optional,
    parse_retry_after,
    redact,
    require,
)

log = logging.getLogger(__name__)

ENV_API_KEY = "MEMBERCARE_SENDGRID_API_KEY"
ENV_FROM = "MEMBERCARE_SENDGRID_FROM"
ENV_BASE_URL = "MEMBERCARE_SENDGRID_BASE_URL"
ENV_TRANSPORT = "MEMBERCARE_SENDGRID_TRANSPORT"
TRANSPORTS = ("pooled", "sdk")

# SendGrid's 400 answers name the offending JSON field; these prefixes mean the recipient is at fault
# (the address is malformed), everything else is a request/content problem (REJECTED).
_RECIPIENT_FIELDS = re.compile(r"^personalizations\.\d+\.(to|cc|bcc)\.\d+\.email$")
# Message texts SendGrid uses for sender problems: a 400/403 for these is our configuration, not the
# message ("The from address does not match a verified Sender Identity").
_SENDER_PROBLEMS = ("verified sender identity", "from address", "from.email")
# Gateway answers (bad gateway, gateway timeout): an intermediary lost the provider's answer, so the
# provider may have accepted the message. A 500/503 is the provider's own "not done".
AMBIGUOUS_STATUSES = frozenset({502, 504})


class _NoSecretsInDebugLogs(logging.Filter):
    """python_http_client logs the full payload (recipient addresses) and the request headers (the API
    key) at DEBUG. Drop exactly those records so that turning on debug logging leaks nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (msg.startswith("PAYLOAD:") or msg.startswith("HEADERS:") or " Response: " in msg)


_http_client_logger = logging.getLogger("python_http_client.client")
if not any(isinstance(f, _NoSecretsInDebugLogs) for f in _http_client_logger.filters):
    _http_client_logger.addFilter(_NoSecretsInDebugLogs())


@dataclass(frozen=True)
class SendGridConfig:
    api_key: str = field(repr=False)
    from_email: str
    from_name: str | None = None
    base_url: str | None = None  # None: the real SendGrid API
    timeout_s: float = DEFAULT_TIMEOUT_S
    transport: str = "pooled"  # "pooled": SDK-built requests over a keep-alive pool; "sdk": the SDK's urllib
    pool_size: int = 128  # keep-alive connections (pooled transport), opened lazily: at least the dispatcher's workers

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigurationError(f"{ENV_TRANSPORT} must be one of {', '.join(TRANSPORTS)}")
        if not self.api_key:
            raise ConfigurationError(f"{ENV_API_KEY} is empty")
        if "@" not in self.from_email:
            raise ConfigurationError(f"{ENV_FROM} must be an email address (optionally 'Name <address>')")
        if self.timeout_s <= 0:
            raise ConfigurationError("SendGrid timeout must be positive")
        object.__setattr__(self, "base_url", normalise_base_url(self.base_url, ENV_BASE_URL))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SendGridConfig:
        name, address = parseaddr(require(env, ENV_FROM, why="the sender address of every email"))
        if not address:
            raise ConfigurationError(f"{ENV_FROM} is not an email address")
        return cls(
            api_key=require(env, ENV_API_KEY),
            from_email=address,
            from_name=name or None,
            base_url=optional(env, ENV_BASE_URL),
            transport=(optional(env, ENV_TRANSPORT) or "pooled").lower(),
        )


def _with_preheader(html: str, preheader: str | None) -> str:
    """Insert the hidden preheader (inbox preview text) right after ``<body>`` unless the template did."""
    if not preheader or preheader in html:
        return html
    from html import escape

    block = (
        '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all" aria-hidden="true">'
        f"{escape(preheader)}</div>"
    )
    match = re.search(r"<body[^>]*>", html, flags=re.IGNORECASE)
    if match:
        return html[: match.end()] + block + html[match.end() :]
    return block + html


class SendGridEmailChannel:
    """:class:`~membercare.delivery.contract.ChannelAdapter` for email via SendGrid."""

    channel = Channel.EMAIL

    def __init__(self, config: SendGridConfig):
        from sendgrid import SendGridAPIClient

        self.config = config
        kwargs = {"host": config.base_url} if config.base_url else {}
        self._client = SendGridAPIClient(config.api_key, **kwargs)
        # Propagates to every per-request child client the SDK builds.
        self._client.client.timeout = config.timeout_s
        self._transport = None
        mail_send = self._client.client.mail.send
        self._url = mail_send._build_url(None)  # the SDK's own URL: {host}/v3/mail/send
        self._headers = {**self._client.client.request_headers, "Content-Type": "application/json"}
        if config.transport == "pooled":
            from channels.base import KeepAliveTransport

            self._transport = KeepAliveTransport(self._url, pool_size=config.pool_size, timeout_s=config.timeout_s)
        from channels._aiohttp import AioTransport

        self._aio = AioTransport(self._url, pool_size=config.pool_size, timeout_s=config.timeout_s)

    def build_payload(self, message: OutboundMessage) -> dict:
        """The Mail Send request body, built with the SDK's helpers (public for tests and previews)."""
        from sendgrid.helpers.mail import Category, CustomArg, From, Header, HtmlContent, Mail, PlainTextContent, To

        content = message.content
        if not isinstance(content, EmailContent):
            raise TypeError(f"SendGridEmailChannel cannot send {type(content).__name__}")
        # Set addresses through the setters: the helpers' constructors parse "Name <address>" and turn
        # anything without "@" into a *name*, which then crashes inside the SDK instead of reaching
        # SendGrid's validation (and its clean 400 for an invalid recipient).
        to, sender = To(), From()
        to.email = message.to
        sender.email = self.config.from_email
        if self.config.from_name:
            sender.name = self.config.from_name
        mail = Mail(
            from_email=sender,
            to_emails=to,
            subject=content.subject,
            plain_text_content=PlainTextContent(content.text) if content.text else None,
            html_content=HtmlContent(_with_preheader(content.html, content.preheader)) if content.html else None,
        )
        # Personalization-level custom_args: they are per recipient by meaning, SendGrid merges them into
        # every event the same way, and the official spec types the top-level field as a string (an
        # object there fails the contract test).
        mail.custom_arg = [CustomArg(MESSAGE_ID_ARG, message.message_id, p=0),
                           CustomArg(IDEMPOTENCY_KEY_ARG, message.idempotency_key, p=0)]
        categories = list(dict.fromkeys(c for c in message.categories if c))[:10]  # SendGrid's limit: 10
        if categories:
            mail.category = [Category(c) for c in categories]
        if content.headers:
            mail.header = [Header(k, v) for k, v in content.headers.items()]
        return mail.get()

    def send(self, message: OutboundMessage) -> SendResult:
        from python_http_client import exceptions as hx

        payload = self.build_payload(message)
        if self._transport is not None:
            return self._send_pooled(payload, message)
        try:
            response = self._client.client.mail.send.post(request_body=payload)
        except hx.HTTPError as exc:
            return self._from_http_error(exc, message)
        except urllib.error.URLError as exc:
            # urllib wraps exactly the errors of connecting and *writing* the request in URLError
            # (AbstractHTTPHandler.do_open): the provider cannot have accepted a request it never fully got.
            reason = exc.reason
            kind = "timeout" if isinstance(reason, (TimeoutError, socket.timeout)) else "connection error"
            return TransientFailure(reason=f"{kind} before the request was sent: {type(reason).__name__}")
        except TimeoutError as exc:
            # Raised while waiting for the answer: the request was written and may have been accepted.
            return TransientFailure(reason=f"read timeout after sending: {exc}", ambiguous=True)
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            # The connection broke after the request was written (RemoteDisconnected, reset, a torn answer).
            return TransientFailure(reason=f"connection lost after sending: {type(exc).__name__}", ambiguous=True)
        provider_id = response.headers.get("X-Message-Id") if response.headers else None
        if not provider_id:
            # SendGrid always sets it on 202; without it engagement cannot be matched by provider id,
            # but our message id in custom_args still maps events back.
            log.warning("SendGrid accepted %s without X-Message-Id", message.message_id)
            provider_id = ""
        return Accepted(provider_message_id=provider_id, status=response.status_code)

    def _send_pooled(self, payload: dict, message: OutboundMessage) -> SendResult:
        from urllib3.exceptions import HTTPError

        from channels.base import urllib3_failure

        # Serialised as the SDK does (json.dumps, UTF-8), so the provider sees the same bytes.
        body = json.dumps(payload).encode("utf-8")
        assert self._transport is not None  # built in __init__ (keep-alive pool), only None after close()
        try:
            response = self._transport.request("POST", self._url, body=body, headers=self._headers)
        except HTTPError as exc:
            return urllib3_failure(exc)
        if response.status >= 300:
            return self._from_status(response.status, response.headers, response.data, message)
        provider_id = response.headers.get("X-Message-Id")
        if not provider_id:
            log.warning("SendGrid accepted %s without X-Message-Id", message.message_id)
            provider_id = ""
        return Accepted(provider_message_id=provider_id, status=response.status)

    async def send_async(self, message: OutboundMessage) -> SendResult:
        """:meth:`send` on the dispatcher's event loop: the same SDK-built request (Mail JSON, URL, headers)
        sent with aiohttp (:class:`channels._aiohttp.AioTransport`), the answer mapped by the same rules."""
        from channels._aiohttp import aiohttp_failure, transport_errors

        payload = self.build_payload(message)
        body = json.dumps(payload).encode("utf-8")  # as the SDK serialises it
        try:
            status, headers, data = await self._aio.request("POST", self._url, body=body, headers=self._headers)
        except transport_errors() as exc:
            return aiohttp_failure(exc)
        if status >= 300:
            return self._from_status(status, headers, data, message)
        provider_id = headers.get("X-Message-Id")
        if not provider_id:
            log.warning("SendGrid accepted %s without X-Message-Id", message.message_id)
            provider_id = ""
        return Accepted(provider_message_id=provider_id, status=status)

    def _from_http_error(self, exc, message: OutboundMessage) -> SendResult:
        return self._from_status(int(getattr(exc, "status_code", 0) or 0), getattr(exc, "headers", None) or {},
                                 getattr(exc, "body", b""), message)

    def _from_status(self, status: int, headers, body, message: OutboundMessage) -> SendResult:
        errors = _error_list(body)
        detail = "; ".join(filter(None, (e.get("message") for e in errors)))[:500]
        if status in (401, 403):
            # Mail Send's 403s are all account problems (key lacks mail.send, unverified sender,
            # suspended account): each would fail every message, so stop the run.
            raise ConfigurationError(
                f"SendGrid refused the credentials ({status}): {detail or 'no detail'}; check {ENV_API_KEY}"
                f" (and that {ENV_FROM} is a verified sender)"
            )
        if status == 404:
            raise ConfigurationError(f"SendGrid answered 404 for /v3/mail/send: check {ENV_BASE_URL}")
        if status == 429:
            return TransientFailure(reason="throttled by SendGrid", throttled=True, status=status,
                                    retry_after=parse_retry_after(_header(headers, "Retry-After"))
                                    or _reset_delay(headers))
        if status >= 500 or status in (408,):
            # 502/504 come from a gateway that lost the upstream's answer: the send may have happened.
            return TransientFailure(reason=f"SendGrid {status}: {detail or 'server error'}", status=status,
                                    retry_after=parse_retry_after(_header(headers, "Retry-After")),
                                    ambiguous=status in AMBIGUOUS_STATUSES)
        if status == 400 and any(_RECIPIENT_FIELDS.match(str(e.get("field") or "")) for e in errors):
            log.info("SendGrid rejected recipient %s of %s", redact(message.to), message.message_id)
            return PermanentFailure(FailureReason.INVALID_RECIPIENT, detail=detail, status=status, fallback=True)
        if status == 400 and any(s in detail.lower() for s in _SENDER_PROBLEMS):
            raise ConfigurationError(f"SendGrid rejected the sender: {detail}; check {ENV_FROM}")
        return PermanentFailure(FailureReason.REJECTED, detail=detail or f"HTTP {status}", status=status,
                                fallback=True)

    def close(self) -> None:
        """Close the keep-alive pools (the SDK transport has nothing to release)."""
        if self._transport is not None:
            self._transport.close()
        self._aio.close()


def _error_list(body) -> list[dict]:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return []
    errors = data.get("errors") if isinstance(data, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _header(headers, name: str) -> str | None:
    try:
        value = headers.get(name)
    except AttributeError:
        return None
    if value is None and hasattr(headers, "items"):
        for k, v in headers.items():
            if k.lower() == name.lower():
                return v
    return value


def _reset_delay(headers) -> float | None:
    """SendGrid's own rate-limit answer carries ``X-RateLimit-Reset`` (epoch seconds), not Retry-After."""
    import time

    value = _header(headers, "X-RateLimit-Reset")
    try:
        return max(0.0, float(value) - time.time()) if value else None
    except ValueError:
        return None
