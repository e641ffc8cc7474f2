"""SMS through Twilio's Programmable Messaging API, on the official ``twilio`` SDK.

Configuration (:class:`TwilioConfig`, from the environment or a Prefect Secret block):

``MEMBERCARE_TWILIO_ACCOUNT_SID``            required (``AC...``)
``MEMBERCARE_TWILIO_AUTH_TOKEN``             required; never logged
``MEMBERCARE_TWILIO_FROM``                   the sending number (E.164) or alphanumeric sender id, or
``MEMBERCARE_TWILIO_MESSAGING_SERVICE_SID``  a Messaging Service (``MG...``) that picks the sender;
                                              one of the two is required, the service wins if both are set
``MEMBERCARE_TWILIO_BASE_URL``               optional; unset means the real Twilio API
``MEMBERCARE_PUBLIC_URL``                    optional; our externally visible base URL. Every message asks
                                              Twilio for status callbacks at
                                              ``/webhooks/twilio/status?mid=<message id>&ik=<idempotency key>``
                                              under it. Unset: ``membercare serve``'s default
                                              (``http://127.0.0.1:8080``) when the API is local (the sandbox);
                                              no callback against the real Twilio, which refuses callback URLs
                                              it cannot reach (error 21609)

Our message id travels with every SMS in the status-callback URL, and it is recoverable without any
callback: :meth:`TwilioSmsChannel.list_messages` reads Twilio's message list for a recipient and a time
window, and :class:`membercare.delivery.provider_records.TwilioListRecords` matches recipient, exact body
and time against the ledger's stored content. The list is the path that always works (a public URL can be
missing, wrong or down; callbacks can be lost); the callback settles rows sooner when it arrives.

The SDK has no base-URL setting. Setting ``client.api.base_url`` breaks as soon as ``TWILIO_REGION`` or
``TWILIO_EDGE`` is set (the SDK rewrites the host after us), so :class:`_BaseUrlHttpClient` rewrites the
scheme and host of every outgoing request instead, after the SDK has built the final URL.

Transport: the SDK builds every request (URL, form parameters, headers, Basic auth) and hands it to its
pluggable ``HttpClient``; ours (a ``TwilioHttpClient`` subclass) sends it over one keep-alive connection
pool (:class:`channels.base.KeepAliveTransport` on urllib3, sized for the dispatcher's worker threads,
thread-safe) instead of a ``requests`` session, which cost more than twice the CPU per message. The
bytes on the wire are what ``requests`` would send: the form body encoded as ``requests`` encodes it,
``requests``' own Basic-auth header. SDK-side retries are off: the delivery engine retries with backoff and
honours ``Retry-After``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from channels.base import (
    CALLBACK_IDEMPOTENCY_KEY_PARAM,
    CALLBACK_MESSAGE_ID_PARAM,
    DEFAULT_TIMEOUT_S,
    Accepted,
    Channel,
    ConfigurationError,
    FailureReason,
    OutboundMessage,
    PermanentFailure,
    SendResult,
    SmsContent,
    TransientFailure,
    normalise_base_url,
    optional,
    parse_retry_after,
    redact,
    require,
    transport_failure,
    urllib3_failure,
)

log = logging.getLogger(__name__)

ENV_ACCOUNT_SID = "MEMBERCARE_TWILIO_ACCOUNT_SID"
ENV_AUTH_TOKEN = "MEMBERCARE_TWILIO_AUTH_TOKEN"
ENV_FROM = "MEMBERCARE_TWILIO_FROM"
ENV_MESSAGING_SERVICE_SID = "MEMBERCARE_TWILIO_MESSAGING_SERVICE_SID"
ENV_BASE_URL = "MEMBERCARE_TWILIO_BASE_URL"
ENV_PUBLIC_URL = "MEMBERCARE_PUBLIC_URL"
STATUS_CALLBACK_PATH = "/webhooks/twilio/status"

# Twilio error codes (https://www.twilio.com/docs/api/errors) that tell us what to do with a message.
# (reason, fallback to another channel?)
PERMANENT_CODES: dict[int, tuple[FailureReason, bool]] = {
    21211: (FailureReason.INVALID_RECIPIENT, True),  # invalid 'To' phone number
    21214: (FailureReason.INVALID_RECIPIENT, True),  # 'To' number cannot be reached
    21217: (FailureReason.INVALID_RECIPIENT, True),  # phone number does not appear to be valid
    21614: (FailureReason.INVALID_RECIPIENT, True),  # 'To' number is not a valid mobile number
    21612: (FailureReason.INVALID_RECIPIENT, True),  # 'To' number not reachable via SMS from this sender
    21610: (FailureReason.OPTED_OUT, False),         # recipient replied STOP: not another channel either
    21408: (FailureReason.BLOCKED, True),            # region not enabled for this account
    21635: (FailureReason.BLOCKED, True),            # 'To' number cannot receive SMS (e.g. some landlines)
    30007: (FailureReason.BLOCKED, True),            # carrier filtered the message
    21602: (FailureReason.REJECTED, True),           # message body is required
    21617: (FailureReason.REJECTED, True),           # body exceeds 1600 characters
}
# Codes that mean our settings are wrong: they would fail every message.
CONFIGURATION_CODES = {
    20003: "authentication failed: check " + ENV_ACCOUNT_SID + " and " + ENV_AUTH_TOKEN,
    20404: "the account or resource does not exist: check " + ENV_ACCOUNT_SID + " and " + ENV_BASE_URL,
    21212: "invalid 'From' number: check " + ENV_FROM,
    21606: "the 'From' number cannot send SMS or is not owned by the account: check " + ENV_FROM,
    21659: "the 'From' number is not a Twilio number of this account: check " + ENV_FROM,
    21603: "neither a 'From' number nor a Messaging Service is set",
    21701: "the Messaging Service does not exist: check " + ENV_MESSAGING_SERVICE_SID,
    21703: "the Messaging Service has no senders: check " + ENV_MESSAGING_SERVICE_SID,
}
THROTTLE_CODES = {20429, 14107, 30022}  # too many requests / SMS rate limit / 10DLC throughput exceeded
# Gateway answers: an intermediary lost the provider's answer, so the message may have been created.
AMBIGUOUS_STATUSES = frozenset({502, 504})


@dataclass(frozen=True)
class TwilioConfig:
    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str | None = None
    messaging_service_sid: str | None = None
    base_url: str | None = None  # None: the real Twilio API
    public_url: str | None = None  # our webhook base URL for status callbacks
    timeout_s: float = DEFAULT_TIMEOUT_S
    pool_size: int = 128  # keep-alive connections, opened lazily: at least the dispatcher's worker threads

    def __post_init__(self) -> None:
        if not self.account_sid:
            raise ConfigurationError(f"{ENV_ACCOUNT_SID} is empty")
        if not self.auth_token:
            raise ConfigurationError(f"{ENV_AUTH_TOKEN} is empty")
        if not (self.from_number or self.messaging_service_sid):
            raise ConfigurationError(f"set {ENV_FROM} or {ENV_MESSAGING_SERVICE_SID}")
        object.__setattr__(self, "base_url", normalise_base_url(self.base_url, ENV_BASE_URL))
        object.__setattr__(self, "public_url", normalise_base_url(self.public_url, ENV_PUBLIC_URL))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TwilioConfig:
        sid, token = require(env, ENV_ACCOUNT_SID), require(env, ENV_AUTH_TOKEN)
        from_number, service = optional(env, ENV_FROM), optional(env, ENV_MESSAGING_SERVICE_SID)
        if not (from_number or service):
            raise ConfigurationError(f"{ENV_FROM} or {ENV_MESSAGING_SERVICE_SID} is not set: one is required")
        return cls(account_sid=sid, auth_token=token, from_number=from_number, messaging_service_sid=service,
                   base_url=optional(env, ENV_BASE_URL), public_url=optional(env, ENV_PUBLIC_URL))

    @property
    def callback_base(self) -> str | None:
        """Where status callbacks go: ``public_url``; else, against a local API (``base_url`` set: the
        sandbox), ``membercare serve``'s default address, which that API can reach; else none (the real
        Twilio answers 21609 for a callback URL it cannot reach, which would refuse every message)."""
        if self.public_url:
            return self.public_url
        if self.base_url:
            from membercare.links import DEFAULT_PUBLIC_URL

            return DEFAULT_PUBLIC_URL
        return None

    def status_callback(self, message: OutboundMessage) -> str | None:
        base = self.callback_base
        if not base:
            return None
        query = urlencode({CALLBACK_MESSAGE_ID_PARAM: message.message_id,
                           CALLBACK_IDEMPOTENCY_KEY_PARAM: message.idempotency_key})
        return f"{base}{STATUS_CALLBACK_PATH}?{query}"


def _form(values) -> str:
    """Form-encode like ``requests`` does for a dict body or query: ``None`` values left out, lists repeated."""
    if not values:
        return ""
    items = values.items() if hasattr(values, "items") else values
    return urlencode([(k, v) for k, v in items if v is not None], doseq=True)


def _make_http_client(config: TwilioConfig):
    from twilio.http.http_client import TwilioHttpClient

    from channels.base import KeepAliveTransport

    class _BaseUrlHttpClient(TwilioHttpClient):
        """Rewrites scheme and host (and prefixes any base path) of every request to ``base_url``, sends it
        over the keep-alive pool, and remembers the last response per thread so that error mapping can read
        ``Retry-After``. Transport errors surface as ``urllib3`` exceptions (see ``send``)."""

        def __init__(self) -> None:
            super().__init__(pool_connections=False, timeout=config.timeout_s)
            self.transport = KeepAliveTransport(config.base_url or "https://api.twilio.com",
                                                pool_size=config.pool_size, timeout_s=config.timeout_s)
            self._local = threading.local()
            base = urlsplit(config.base_url) if config.base_url else None
            self._base = base

        def request(self, method, url, params=None, data=None, headers=None, auth=None, timeout=None,
                    allow_redirects=False):
            from twilio.http.response import Response

            self._local.response = None
            # The SDK's request/response logging formats every header eagerly: only when someone listens.
            logging_on = self.logger.isEnabledFor(logging.INFO)
            method, url, body, wire_headers = _wire_request(self._base, method, url, params, data, headers, auth)
            if logging_on:
                self.log_request({"method": method, "url": url.split("?")[0], "params": params, "headers": headers})
            headers = wire_headers
            raw = self.transport.request(method, url, body=body, headers=headers)
            response = Response(int(raw.status), raw.data.decode("utf-8", "replace"), raw.headers)
            if logging_on:
                self.log_response(response.status_code, response)
            self._test_only_last_response = response
            self._local.response = response
            return response

        def last_response_here(self):
            return getattr(self._local, "response", None)

    return _BaseUrlHttpClient()


_last_async_response: ContextVar[Any] = ContextVar("twilio_last_async_response", default=None)


def _make_async_http_client(config: TwilioConfig):
    from twilio.http import AsyncHttpClient

    from channels._aiohttp import AioTransport

    class _AioHttpClient(AsyncHttpClient):
        """The asynchronous twin of ``_BaseUrlHttpClient`` for the SDK's ``*_async`` calls: the same URL
        rewrite, form encoding and Basic auth, sent with aiohttp on the running loop. The response of the
        current task is kept in a context variable so that error mapping can read ``Retry-After``.
        Transport errors surface as aiohttp/asyncio exceptions."""

        def __init__(self) -> None:
            super().__init__(logger=logging.getLogger("twilio.http_client"), is_async=True, timeout=config.timeout_s)
            self.transport = AioTransport(config.base_url or "https://api.twilio.com",
                                          pool_size=config.pool_size, timeout_s=config.timeout_s)
            self._base = urlsplit(config.base_url) if config.base_url else None

        async def request(self, method, url, params=None, data=None, headers=None, auth=None, timeout=None,
                          allow_redirects=False):
            from twilio.http.response import Response

            method, url, body, wire_headers = _wire_request(self._base, method, url, params, data, headers, auth)
            _last_async_response.set(None)
            logging_on = self.logger.isEnabledFor(logging.INFO)
            if logging_on:
                self.log_request({"method": method, "url": url.split("?")[0], "params": params, "headers": headers})
            status, answer_headers, raw = await self.transport.request(method, url, body=body, headers=wire_headers)
            response = Response(int(status), raw.decode("utf-8", "replace"), answer_headers)
            if logging_on:
                self.log_response(response.status_code, response)
            _last_async_response.set(response)
            return response

    return _AioHttpClient()


def _wire_request(base, method, url, params, data, headers, auth):
    """(method, url, body, headers) on the wire for a request the SDK built: ``base``'s scheme and host (and
    path prefix), ``params`` in the query, ``data`` form-encoded (or JSON), ``requests``' Basic-auth header."""
    from requests.auth import _basic_auth_str

    if base is not None:
        parts = urlsplit(url)
        url = urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + parts.path, parts.query, parts.fragment))
    query = _form(params)
    if query:
        url = f"{url}{'&' if urlsplit(url).query else '?'}{query}"
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = _basic_auth_str(*auth)
    body = None
    if data is not None:
        if headers.get("Content-Type") in ("application/json", "application/scim+json"):
            import json

            body = json.dumps(data).encode("utf-8")
        else:
            body = _form(data).encode("utf-8")
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    return method.upper(), url, body, headers


class TwilioSmsChannel:
    """:class:`~membercare.delivery.contract.ChannelAdapter` for SMS via Twilio."""

    channel = Channel.SMS

    def __init__(self, config: TwilioConfig):
        from twilio.rest import Client

        self.config = config
        self._http = _make_http_client(config)
        self._client = Client(config.account_sid, config.auth_token, http_client=self._http)
        # The SDK builds its domain/version/account objects lazily; build them once here so that
        # worker threads never race on that lazy initialisation.
        self._messages = self._client.api.v2010.account.messages
        # The SDK's own async path (``create_async``) on our aiohttp client, for the dispatcher's event loop.
        self._aio_http = _make_async_http_client(config)
        self._aio_client = Client(config.account_sid, config.auth_token, http_client=self._aio_http)
        self._aio_messages = self._aio_client.api.v2010.account.messages

    def _create_kwargs(self, message: OutboundMessage) -> dict:
        content = message.content
        if not isinstance(content, SmsContent):
            raise TypeError(f"TwilioSmsChannel cannot send {type(content).__name__}")
        kwargs: dict = {"to": message.to, "body": content.body}
        if self.config.messaging_service_sid:
            kwargs["messaging_service_sid"] = self.config.messaging_service_sid
        else:
            kwargs["from_"] = self.config.from_number
        callback = self.config.status_callback(message)
        if callback:
            kwargs["status_callback"] = callback
        return kwargs

    async def send_async(self, message: OutboundMessage) -> SendResult:
        """:meth:`send` on the dispatcher's event loop: the SDK's ``messages.create_async`` builds the request
        and parses the answer (raising the same ``TwilioRestException``), aiohttp carries it."""
        from twilio.base.exceptions import TwilioRestException

        from channels._aiohttp import aiohttp_failure, transport_errors

        kwargs = self._create_kwargs(message)
        try:
            created = await self._aio_messages.create_async(**kwargs)
        except TwilioRestException as exc:
            return self._from_rest_error(exc, message, _last_async_response.get())
        except transport_errors() as exc:
            return aiohttp_failure(exc)
        return Accepted(provider_message_id=created.sid, status=201)

    def send(self, message: OutboundMessage) -> SendResult:
        import requests
        from twilio.base.exceptions import TwilioRestException
        from urllib3.exceptions import HTTPError

        kwargs = self._create_kwargs(message)
        try:
            created = self._messages.create(**kwargs)
        except TwilioRestException as exc:
            return self._from_rest_error(exc, message)
        except HTTPError as exc:  # from the keep-alive transport
            return urllib3_failure(exc)
        except requests.RequestException as exc:  # a requests-based http_client, if one is ever plugged in
            return transport_failure(exc)
        return Accepted(provider_message_id=created.sid, status=201)

    def list_messages(self, to: str, *, first_day: date, last_day: date, page_size: int = 1000) -> list:
        """Every outbound message Twilio lists for recipient ``to`` sent on ``first_day`` .. ``last_day``
        (GMT days, inclusive), from our sender: ``GET /2010-04-01/Accounts/{sid}/Messages.json`` through the
        SDK's ``messages.list`` with ``To``, ``From`` (when we send from a fixed number; a Messaging
        Service's messages are kept by ``messaging_service_sid`` instead) and ``DateSent>``/``DateSent<``,
        following ``next_page_uri`` to the last page.

        The date filters are sent as midnight timestamps (``first_day`` 00:00 and the day after
        ``last_day`` 00:00 UTC): Twilio documents them at day granularity, and whether it compares the
        date or the instant, that range covers the whole days; callers filter the exact window.

        Returns :class:`~membercare.delivery.provider_records.ListedMessage` items. Raises
        :class:`~membercare.delivery.provider_records.ProviderLookupError` (naming no number) when any page
        cannot be read: a partial list must never be taken for a complete one.
        """
        from datetime import datetime, time, timedelta

        from membercare.delivery.provider_records import ListedMessage, ProviderLookupError
        from membercare.timeutil import UTC

        kwargs: dict = {"to": to, "page_size": page_size,
                        "date_sent_after": datetime.combine(first_day, time(0), UTC),
                        "date_sent_before": datetime.combine(last_day + timedelta(days=1), time(0), UTC)}
        if not self.config.messaging_service_sid:
            kwargs["from_"] = self.config.from_number
        try:
            items = self._messages.list(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the SDK's errors quote the request URL, which holds the number
            status = getattr(exc, "status", None)
            if status is None and len(exc.args) > 1:  # TwilioException("Unable to fetch page", response)
                status = getattr(exc.args[1], "status_code", None)
            raise ProviderLookupError(f"Twilio message list failed ({type(exc).__name__}"
                                      f"{f', HTTP {status}' if isinstance(status, int) else ''})") from None
        out = []
        for m in items:
            direction = str(getattr(m.direction, "value", m.direction) or "")
            if not direction.startswith("outbound"):
                continue
            if self.config.messaging_service_sid and m.messaging_service_sid != self.config.messaging_service_sid:
                continue
            status = getattr(m.status, "value", m.status)
            out.append(ListedMessage(sid=m.sid, to=m.to, body=m.body, status=None if status is None else str(status),
                                     sent_at=m.date_sent, created_at=m.date_created))
        return out

    def _from_rest_error(self, exc, message: OutboundMessage, response=None) -> SendResult:
        status, code = int(exc.status or 0), int(exc.code or 0)
        detail = f"Twilio {code or status}: {exc.msg}"[:500]
        if code in CONFIGURATION_CODES:
            raise ConfigurationError(f"Twilio error {code}: {CONFIGURATION_CODES[code]}")
        if status in (401, 403):
            raise ConfigurationError(f"Twilio refused the credentials ({status}, code {code}): "
                                     f"check {ENV_ACCOUNT_SID} and {ENV_AUTH_TOKEN}")
        if status == 429 or code in THROTTLE_CODES:
            if response is None:
                response = self._http.last_response_here()
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
            return TransientFailure(reason=detail, throttled=True, retry_after=retry_after, status=status)
        if code in PERMANENT_CODES:
            reason, fallback = PERMANENT_CODES[code]
            log.info("Twilio refused %s for %s: %s", redact(message.to), message.message_id, code)
            return PermanentFailure(reason, detail=detail, fallback=fallback, status=status, provider_code=str(code))
        if status >= 500 or status == 408:
            return TransientFailure(reason=detail, status=status, ambiguous=status in AMBIGUOUS_STATUSES)
        if status == 404:
            raise ConfigurationError(f"Twilio answered 404 (code {code}): check {ENV_ACCOUNT_SID} and {ENV_BASE_URL}")
        return PermanentFailure(FailureReason.REJECTED, detail=detail, fallback=True, status=status,
                                provider_code=str(code) if code else None)

    def close(self) -> None:
        self._http.transport.close()
        self._aio_http.transport.close()
