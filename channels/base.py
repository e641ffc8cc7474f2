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

An adapter may also have the optional :class:`BatchSender` capability (``max_batch`` and
``send_many(messages, batch_key)``: one request carrying one content to many recipients, LINE's
multicast); the dispatcher uses it for rows of byte-identical content and otherwise calls ``send``.

Providers are plug-ins (see docs/channels.md, "Adding a provider"): each lives in its own folder
(``channels/<name>/``) and exposes one object satisfying :class:`Provider`; ``channels.registry`` maps
names to them. A provider's webhooks follow one shape, learnt from django-anymail's webhook views:
:meth:`Webhook.check_headers` (no body read yet), :meth:`Webhook.validate_request` (signature over the
exact bytes), :meth:`Webhook.parse_events` (the events to store), then :meth:`Webhook.answer`. The
receiver (``membercare.receiver``) mounts every registered provider's webhooks and does the rest the same
way for all of them: body limits, the secret lookup, storage, the transaction, logging.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import parse_qsl

from membercare.delivery.contract import (
    Accepted,
    BatchSender,
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
from membercare.errors import ConfigurationError, InputError
from membercare.models import Channel, Purpose

if TYPE_CHECKING:
    import requests
    import urllib3

    from membercare.engagement.events import EngagementEvent
    from membercare.engagement.store import IngestResult

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
    "BatchSender",
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
    "Provider",
    "ProviderBase",
    "Purpose",
    "PushContent",
    "SendResult",
    "SmsContent",
    "TransientFailure",
    "Webhook",
    "WebhookAnswer",
    "WebhookBatch",
    "WebhookContext",
    "WebhookRejected",
    "WebhookRequest",
    "form_params",
    "normalise_base_url",
    "optional",
    "parse_retry_after",
    "redact",
    "require",
]


# -- providers as plug-ins ---------------------------------------------------------------------------------


@runtime_checkable
class Provider(Protocol):
    """One provider plug-in (SendGrid, Twilio, FCM, ...), registered by :attr:`name` in ``channels.registry``.

    Implementations keep their SDK imports inside methods, so that listing the registry costs no SDK import.
    """

    @property
    def name(self) -> str:
        """Registry key, also the value of ``MEMBERCARE_PROVIDER_<CHANNEL>`` that selects it ("sendgrid")."""
        ...

    @property
    def channel(self) -> Channel:
        """The channel it sends on."""
        ...

    @property
    def primary_env(self) -> str:
        """The environment variable whose presence means "this provider is configured" (``build_channels``
        builds it without being asked when it is set; a partly configured provider is an error)."""
        ...

    @property
    def config_type(self) -> type:
        """The class of its configuration object (``adapter_for(config)`` finds the provider by it)."""
        ...

    @property
    def webhook_secret_env(self) -> str | None:
        """The environment variable holding the secret that authenticates its webhooks, or ``None``."""
        ...

    def config_from_env(self, env: Mapping[str, str]) -> Any:
        """Its configuration read from ``env``; raises :class:`ConfigurationError` naming a missing variable."""
        ...

    def build(self, config: Any) -> ChannelAdapter:
        """The adapter for ``config`` (an instance of :attr:`config_type`)."""
        ...

    def webhooks(self) -> Sequence[Webhook]:
        """The webhook endpoints it serves (empty when the provider reports nothing back)."""
        ...

    def check_webhook_secret(self, secret: str) -> None:
        """Raise :class:`ConfigurationError` at start-up when ``secret`` cannot be a valid webhook secret
        (the receiver must never find out on the first webhook, nor tell an attacker)."""
        ...


class ProviderBase:
    """A convenient :class:`Provider`: declare the class attributes, override only what differs.

    The configuration class must offer ``from_env(env)`` and the adapter class take the configuration as its
    only argument; :attr:`webhook_types` lists the :class:`Webhook` subclasses served; any non-empty webhook
    secret is accepted unless :meth:`check_webhook_secret` is overridden.
    """

    name: str
    channel: Channel
    primary_env: str
    config_type: type
    adapter_type: ClassVar[type]
    webhook_secret_env: str | None = None
    webhook_types: ClassVar[tuple[type[Webhook], ...]] = ()

    def config_from_env(self, env: Mapping[str, str]) -> Any:
        return self.config_type.from_env(env)  # type: ignore[attr-defined]

    def build(self, config: Any) -> ChannelAdapter:
        return self.adapter_type(config)

    def webhooks(self) -> Sequence[Webhook]:
        return tuple(webhook() for webhook in self.webhook_types)

    def check_webhook_secret(self, secret: str) -> None:
        return None

    def __repr__(self) -> str:
        return f"<provider {self.name} ({self.channel.value})>"


class WebhookRejected(InputError):
    """A webhook request refused with ``status`` (401, 403, 400, 503) and a short ``detail`` for the answer.

    ``log_message``, when given, is logged as a warning by the receiver; it must hold no personal data.
    """

    def __init__(self, status: int, detail: str, *, log_message: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.log_message = status, detail, log_message


@dataclass(frozen=True)
class WebhookRequest:
    """What the receiver hands a provider's webhook, free of any web framework.

    ``headers`` is case-insensitive; ``body`` holds the exact bytes received (already bounded and checked
    to be UTF-8 by the receiver); ``query`` is the query string as sent. ``secret`` is the provider's
    configured webhook secret; ``public_url`` our externally visible base URL. ``tolerance_s`` bounds
    signed timestamps, ``max_age_s`` the age of events whose time is inside a signed body (the receiver's
    ``MEMBERCARE_WEBHOOK_TOLERANCE_S`` and ``MEMBERCARE_PUSH_MAX_AGE_S``); ``now`` is the receiver's clock.
    """

    path: str
    query: str
    query_params: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    secret: str
    public_url: str
    tolerance_s: float
    max_age_s: float
    now: datetime

    @property
    def url(self) -> str:
        """The URL the provider called: our public base URL, the path and the query exactly as sent."""
        return f"{self.public_url}{self.path}" + (f"?{self.query}" if self.query else "")

    @cached_property
    def form(self) -> dict[str, str]:
        """The body as form parameters (see :func:`form_params`), parsed once per request."""
        return form_params(self.body)


@dataclass
class WebhookBatch:
    """The events of one request, as :meth:`Webhook.parse_events` found them.

    ``rejected`` lists ``(index, error)`` of items refused on their own (``None``: the provider's answer has
    no such list); ``positions`` maps each event back to its index in the request when some were refused.
    ``fields`` names the store's cleaned fields in the provider's own terms, for the answer.
    ``params`` keeps what the answer needs from the request (form parameters, say).
    """

    events: list[EngagementEvent]
    rejected: list[tuple[int, str]] | None = None
    positions: list[int] | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WebhookAnswer:
    """The answer to a webhook request: ``json`` (serialised by the receiver) or ``content`` of ``media_type``."""

    status: int = 200
    json: Any = None
    content: str | bytes | None = None
    media_type: str | None = None


class WebhookContext(Protocol):
    """What the receiver offers a webhook's :meth:`Webhook.answer` (for replies to inbound messages)."""

    async def member_locale(self, member_id: int | None) -> str:
        """The member's locale, else the shop's."""
        ...

    def reply_text(self, kind: str, locale: str) -> str:
        """Our localised SMS answer ``kind`` (``"help"``, ``"stopped"``, ``"started"``) in ``locale``."""
        ...

    async def link_accounts(self, provider: str, events: Sequence[EngagementEvent],
                            member_ids: Sequence[int | None]) -> Mapping[str, int]:
        """Act on the committed events that link ``provider``'s user ids to members or ask to (LINE's
        ``accountLink`` and link requests); counts of what was done, empty when nothing is set up for it."""
        ...


class Webhook:
    """One webhook endpoint of a provider (one subclass per endpoint, as django-anymail has one view each).

    The receiver calls, in this order, and answers the first :class:`WebhookRejected` with its status:

    1. the provider's secret must be configured, else 503 with :attr:`secret_missing`;
    2. :meth:`check_headers`: the authentication headers are present (401), before any of the body is read;
    3. :meth:`validate_request`: the signature over the exact bytes received (403; 400 for a body that
       cannot even be checked, such as a form with too many fields);
    4. :meth:`parse_events`: the body in the provider's shape (400 otherwise);
    5. the events are stored and committed (one bulk insert per request, or shared with concurrent
       requests when :attr:`grouped_commit`), then :meth:`answer` builds the 2xx answer.

    Class attributes: :attr:`path` (mounted for :attr:`method`), :attr:`label` (names the endpoint in logs),
    :attr:`body_limit` (bytes; ``None`` takes the receiver's ``max_body_bytes``, meant for large batches)
    applied to paths starting with :attr:`body_limit_prefix` (default: :attr:`path`).
    """

    path: ClassVar[str]
    method: ClassVar[str] = "POST"
    label: ClassVar[str]
    secret_missing: ClassVar[str]
    body_limit: ClassVar[int | None] = None
    body_limit_prefix: ClassVar[str | None] = None
    grouped_commit: ClassVar[bool] = False

    def check_headers(self, headers: Mapping[str, str]) -> None:
        """Raise ``WebhookRejected(401)`` when an authentication header is missing."""
        raise NotImplementedError

    def validate_request(self, request: WebhookRequest) -> None:
        """Raise ``WebhookRejected(403)`` unless the request is authentic and fresh."""
        raise NotImplementedError

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        """The events of an authenticated request; ``WebhookRejected(400)`` when none can be taken."""
        raise NotImplementedError

    async def answer(self, batch: WebhookBatch, result: IngestResult, context: WebhookContext) -> WebhookAnswer:
        """The answer once ``batch`` is committed. Default: JSON counts, plus the events stored without an
        unusable key (``cleaned``) and the ones refused on their own (``rejected``), by request index."""
        return WebhookAnswer(json=counts(batch, result))


def counts(batch: WebhookBatch, result: IngestResult) -> dict[str, Any]:
    """The default 2xx body of :meth:`Webhook.answer`."""
    rejected = batch.rejected
    body: dict[str, Any] = {"received": result.received + len(rejected or ()), "stored": result.stored,
                            "duplicates": result.duplicates}
    if result.cleaned:
        positions = batch.positions
        body["cleaned"] = [{"index": positions[i] if positions is not None else i,
                            "fields": [batch.fields.get(name, name) for name in names]}
                           for i, names in sorted(result.cleaned.items())]
    if rejected is not None:
        body["rejected"] = [{"index": index, "error": error} for index, error in rejected]
    return body


MAX_FORM_FIELDS = 1000  # Twilio posts a few dozen (MediaUrl0..9 included)


def form_params(body: bytes, *, max_fields: int = MAX_FORM_FIELDS) -> dict[str, str]:
    """A form-encoded body as a dict, blank values kept (Twilio signs them); ``WebhookRejected(400)`` for
    a body that is not UTF-8 or has more than ``max_fields`` fields."""
    try:
        text = body.decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields))
    except UnicodeDecodeError:
        raise WebhookRejected(400, "form body is not UTF-8") from None
    except ValueError:
        raise WebhookRejected(400, f"form body has more than {max_fields} fields") from None


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


def resolve_environment_once(session: requests.Session, url: str) -> None:
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
    args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
    if len(args) > 1 and isinstance(args[1], BaseException):
        return type(args[1]).__name__
    return type(error).__name__


# -- urllib3 keep-alive transport (SendGrid, Twilio) -----------------------------------------------------


class KeepAliveTransport:
    """A thread-safe HTTP/1.1 keep-alive connection pool on ``urllib3``, for the adapters' provider calls.

    Why not ``requests``: measured against the sandbox, a ``requests`` session costs about 0.6 ms of CPU per
    call (request preparation, settings merging, cookie jars, adapter look-ups) versus about 0.25 ms for the
    same call on the ``urllib3`` pool underneath it, and the dispatcher is CPU-bound on those calls at high
    rates. What the adapters send is unchanged: the SDKs still build every request (URL, headers, body);
    this class only puts the bytes on the wire.

    Behaviour matches the ``requests`` sessions it replaces: no retries (the delivery engine retries), no
    redirects, one timeout for connect and read, proxies from ``HTTP(S)_PROXY``/``NO_PROXY`` and the CA
    bundle from ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` (else certifi's, as requests does), read once at
    construction. Transport errors are raised as ``urllib3`` exceptions; :func:`urllib3_failure` maps them
    to a :class:`TransientFailure` with the same ambiguity rules as :func:`transport_failure`.
    """

    def __init__(self, base_url: str, *, pool_size: int, timeout_s: float):
        import os
        from urllib.parse import urlsplit

        import urllib3
        from requests.utils import get_environ_proxies

        scheme = urlsplit(base_url).scheme
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        kwargs: dict = dict(num_pools=4, maxsize=pool_size, block=False, retries=False, timeout=self.timeout)
        if scheme == "https":
            import certifi

            kwargs.update(cert_reqs="CERT_REQUIRED",
                          ca_certs=os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                          or certifi.where())
        proxy = get_environ_proxies(base_url).get(scheme) or get_environ_proxies(base_url).get("all")
        self._pool = urllib3.ProxyManager(proxy, **kwargs) if proxy else urllib3.PoolManager(**kwargs)

    def request(self, method: str, url: str, *, body: bytes | None,
                headers: Mapping[str, str]) -> urllib3.BaseHTTPResponse:
        """Send one request; returns the ``urllib3`` response with its body read (the connection goes back
        to the pool). Raises ``urllib3.exceptions.HTTPError`` subclasses on transport errors."""
        return self._pool.urlopen(method, url, body=body, headers=dict(headers), retries=False, redirect=False,
                                  preload_content=True, timeout=self.timeout)

    def connections_opened(self) -> int:
        """TCP connections opened so far (keep-alive reuses them; for tests and diagnostics)."""
        pools = self._pool.pools
        return sum(pools[key].num_connections for key in pools.keys())

    def close(self) -> None:
        self._pool.clear()


def urllib3_failure(exc: BaseException) -> TransientFailure:
    """:func:`transport_failure` for the ``urllib3`` exceptions of :class:`KeepAliveTransport`.

    Not ambiguous: failures establishing the connection (``NewConnectionError``, DNS, connect timeout, TLS
    handshake, proxy): nothing was sent. Ambiguous: a read timeout and a connection lost after the request
    was written (``ProtocolError``), where the provider may have accepted the message.
    """
    from urllib3 import exceptions as ux

    name = type(exc).__name__
    if isinstance(exc, ux.ConnectTimeoutError):  # includes NewConnectionError and NameResolutionError
        kind = "connect timeout" if type(exc) is ux.ConnectTimeoutError else "connection error before sending"
        return TransientFailure(reason=f"{kind}: {name}")
    if isinstance(exc, ux.ReadTimeoutError):
        return TransientFailure(reason=f"read timeout after sending: {name}", ambiguous=True)
    if isinstance(exc, ux.ProtocolError):
        return TransientFailure(reason=f"connection lost after sending: {_cause_name(exc)}", ambiguous=True)
    if isinstance(exc, (ux.SSLError, ux.ProxyError)):
        return TransientFailure(reason=f"connection error before sending: {name}")
    if isinstance(exc, ux.TimeoutError):  # pool timeouts and the like: nothing was written
        return TransientFailure(reason=f"timeout before sending: {name}")
    return TransientFailure(reason=f"request error: {name}")


def _requests_error(exc: BaseException, request):
    """The ``requests`` exception a ``requests`` session would have raised for a ``urllib3`` error, so that
    SDKs that handle ``requests`` exceptions (firebase-admin) and :func:`transport_failure` see the same."""
    import requests
    from urllib3 import exceptions as ux

    if type(exc) is ux.ConnectTimeoutError:
        return requests.ConnectTimeout(exc, request=request)
    if isinstance(exc, ux.ReadTimeoutError):
        return requests.ReadTimeout(exc, request=request)
    if isinstance(exc, ux.SSLError):
        return requests.exceptions.SSLError(exc, request=request)
    if isinstance(exc, ux.ProxyError):
        return requests.exceptions.ProxyError(exc, request=request)
    if isinstance(exc, (ux.ProtocolError, ux.NewConnectionError)):
        return requests.ConnectionError(exc, request=request)  # ProtocolError inside: lost after sending
    return requests.RequestException(exc, request=request)


def keep_alive_adapter(transport: KeepAliveTransport) -> requests.adapters.BaseAdapter:
    """A ``requests`` transport adapter that sends through :class:`KeepAliveTransport`.

    For SDKs that own a ``requests`` session we cannot replace (firebase-admin's ``AuthorizedSession``, which
    adds the OAuth token to each request): mounted on that session for the provider's host, it replaces
    ``requests.adapters.HTTPAdapter``, whose per-request work (TLS context and pool-key look-ups, a CA-bundle
    ``stat``, cookie extraction) was a third of the session's cost. Errors are re-raised as the ``requests``
    exceptions ``HTTPAdapter`` raises for them.
    """
    import requests
    from requests.structures import CaseInsensitiveDict
    from requests.utils import get_encoding_from_headers
    from urllib3.exceptions import HTTPError

    class _KeepAliveAdapter(requests.adapters.BaseAdapter):
        def __init__(self) -> None:
            super().__init__()
            self.transport = transport

        def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
            body = request.body.encode("utf-8") if isinstance(request.body, str) else request.body
            try:
                raw = transport.request(request.method, request.url, body=body, headers=request.headers)
            except HTTPError as exc:
                raise _requests_error(exc, request) from exc
            response = requests.Response()
            response.status_code = raw.status
            response.reason = raw.reason or ""
            response.headers = CaseInsensitiveDict(raw.headers)
            response.encoding = get_encoding_from_headers(response.headers)
            response._content = raw.data
            response.url = request.url
            response.request = request
            response.connection = self  # type: ignore[assignment]  # requests types it as HTTPAdapter
            return response

        def close(self):
            transport.close()

    return _KeepAliveAdapter()
