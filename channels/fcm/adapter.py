"""Push notifications through Firebase Cloud Messaging (HTTP v1), on the official ``firebase-admin`` SDK.

Configuration (:class:`FirebaseConfig`, from the environment or a Prefect Secret block):

``MEMBERCARE_FIREBASE_CREDENTIALS``  required; path to the service-account JSON (its ``project_id``
                                     is the FCM project; its ``token_uri`` is where OAuth tokens come from)
``MEMBERCARE_FCM_BASE_URL``          optional; unset means the real FCM API

Decisions worth knowing:

* **token, not fid.** Our devices table stores FCM *registration tokens* (what the app's
  ``getToken()`` returns); the FCM v1 API addresses them with ``message.token``. firebase-admin 7.7
  deprecates the ``token`` argument in favour of ``fid`` (Firebase Installation IDs), which are a
  different identifier we do not collect. We set the ``token`` attribute after construction: same wire
  request, no DeprecationWarning, and no ``warnings.catch_warnings`` (which is not thread-safe).
* **URL override.** firebase-admin has no public setting for the FCM endpoint: the URL is the private
  class attribute ``messaging._MessagingService.FCM_URL``, read once when an app's messaging service is
  created. We set it under a lock, create the service for *our* app, and restore it, so other Firebase
  apps in the process keep the real URL. firebase-admin is pinned for this reason; a version that moves
  the attribute makes :class:`FirebasePushChannel` fail at start-up with a ConfigurationError, not
  silently send to the real FCM.
* **One retry policy.** The SDK retries 500/503 itself (5 attempts, about 7 s) on a pool of 10
  connections for non-Google hosts. We mount our own ``requests`` transport adapter for the FCM host
  (:func:`channels.base.keep_alive_adapter`: a keep-alive urllib3 pool sized for the dispatcher's threads,
  retries off, about a third less CPU per message than ``HTTPAdapter``): the delivery engine owns retries,
  backoff and Retry-After. The SDK's ``AuthorizedSession`` still adds the OAuth token to every request.
* **No calls to Google when pointed elsewhere.** With ``MEMBERCARE_FCM_BASE_URL`` set, google-auth's
  background "regional access boundary" lookup (``iamcredentials.googleapis.com``) is switched off for the
  adapter's credential; the OAuth token still comes from the service account's ``token_uri``.
* Each adapter owns a uniquely named Firebase app (deleted by :meth:`close`), so adapters with different
  credentials can live in one process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from channels.base import (
    DEFAULT_TIMEOUT_S,
    IDEMPOTENCY_KEY_ARG,
    MESSAGE_ID_ARG,
    Accepted,
    Channel,
    ConfigurationError,
    FailureReason,
    OutboundMessage,
    PermanentFailure,
    PushContent,
    SendResult,
    TransientFailure,
    normalise_base_url,
    optional,
    parse_retry_after,
    redact,
    require,
)

if TYPE_CHECKING:
    from firebase_admin import messaging  # for the annotation only: the SDK is imported where it is used

log = logging.getLogger(__name__)

ENV_CREDENTIALS = "MEMBERCARE_FIREBASE_CREDENTIALS"
ENV_BASE_URL = "MEMBERCARE_FCM_BASE_URL"
FCM_PATH = "/v1/projects/{0}/messages:send"

# FCM error codes (the ``errorCode`` in the FcmError detail) not already typed by the SDK.
# Message fragments of INVALID_ARGUMENT answers that blame the token rather than the payload:
_BAD_TOKEN_HINTS = ("registration token", "not a valid fcm registration token")

# Gateway answers (502, 504 DEADLINE_EXCEEDED): the send may have completed behind the gateway. FCM's
# own 500 INTERNAL / 503 UNAVAILABLE mean the message was not accepted.
AMBIGUOUS_STATUSES = frozenset({502, 504})

_url_lock = threading.Lock()
_app_names = itertools.count(1)


@dataclass(frozen=True)
class FirebaseConfig:
    credentials_path: Path
    base_url: str | None = None  # None: the real FCM API
    timeout_s: float = DEFAULT_TIMEOUT_S
    pool_size: int = 128  # keep-alive connections, opened lazily: at least the dispatcher's worker threads
    # Loaded from credentials_path; kept out of repr because it holds the private key.
    service_account: Mapping = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", normalise_base_url(self.base_url, ENV_BASE_URL))
        if not self.service_account:
            path = Path(self.credentials_path).expanduser()
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigurationError(f"{ENV_CREDENTIALS}: no such file {path}") from None
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"{ENV_CREDENTIALS}: cannot read a JSON service account from "
                                         f"{path}: {type(exc).__name__}") from None
            object.__setattr__(self, "service_account", info)
        info = self.service_account
        if info.get("type") != "service_account":
            raise ConfigurationError(f"{ENV_CREDENTIALS} is not a service-account key (type={info.get('type')!r})")
        for key in ("project_id", "private_key", "client_email", "token_uri"):
            if not info.get(key):
                raise ConfigurationError(f"{ENV_CREDENTIALS}: the service account has no {key!r}")

    @property
    def project_id(self) -> str:
        return str(self.service_account["project_id"])

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FirebaseConfig:
        return cls(credentials_path=Path(require(env, ENV_CREDENTIALS, why="path to the service-account JSON")),
                   base_url=optional(env, ENV_BASE_URL))


def _no_access_boundary_lookup(credential) -> None:
    """Keep google-auth from calling Google when FCM is a local stand-in (the sandbox).

    google-auth 2.6x starts a background "regional access boundary" lookup at
    ``iamcredentials.googleapis.com`` (naming the service account) after each token refresh of a
    service-account credential in the default universe. Against the sandbox that is a request to a real
    Google host with a test identity, so with a base URL set we switch it off on *our* credential only.
    """
    if hasattr(credential, "_is_regional_access_boundary_lookup_required"):
        credential._is_regional_access_boundary_lookup_required = lambda: False


class FirebasePushChannel:
    """:class:`~membercare.delivery.contract.ChannelAdapter` for push via FCM HTTP v1."""

    channel = Channel.PUSH

    def __init__(self, config: FirebaseConfig):
        import firebase_admin
        from firebase_admin import credentials, messaging

        self.config = config
        try:
            cred = credentials.Certificate(dict(config.service_account))
        except ValueError as exc:
            raise ConfigurationError(f"{ENV_CREDENTIALS}: invalid service account: {exc}") from None
        if config.base_url:
            _no_access_boundary_lookup(cred.get_credential())
        self._app = firebase_admin.initialize_app(
            cred, {"projectId": config.project_id, "httpTimeout": config.timeout_s},
            name=f"membercare-push-{next(_app_names)}",
        )
        self._messaging = messaging
        try:
            self._service = self._create_service()
        except Exception:
            firebase_admin.delete_app(self._app)
            raise

    def _create_service(self):
        from firebase_admin import messaging

        cls = getattr(messaging, "_MessagingService", None)
        if cls is None or not isinstance(getattr(cls, "FCM_URL", None), str):
            raise ConfigurationError("this firebase-admin version has no _MessagingService.FCM_URL: "
                                     "pin the tested version (see pyproject.toml)")
        base = self.config.base_url
        with _url_lock:
            original = cls.FCM_URL
            if base:
                cls.FCM_URL = base + FCM_PATH
            try:
                service = messaging._get_messaging_service(self._app)
            finally:
                cls.FCM_URL = original
        url = getattr(service, "_fcm_url", "")
        expected = (base or original.split("/v1/")[0]) + FCM_PATH.format(self.config.project_id)
        if url != expected:
            raise ConfigurationError(f"firebase-admin did not take the FCM URL override (got {url!r}); "
                                     "pin the tested version")
        session = getattr(getattr(service, "_client", None), "session", None)
        if session is not None:
            from channels.base import KeepAliveTransport, keep_alive_adapter, resolve_environment_once

            parts = urlsplit(url)
            transport = KeepAliveTransport(url, pool_size=self.config.pool_size, timeout_s=self.config.timeout_s)
            session.mount(f"{parts.scheme}://{parts.netloc}", keep_alive_adapter(transport))
            resolve_environment_once(session, url)
        else:  # pragma: no cover - only with an untested SDK version
            log.warning("firebase-admin internals changed: SDK retries and pool size are the SDK's defaults")
        self._init_async(service)
        return service

    def _init_async(self, service) -> None:
        """What :meth:`send_async` needs from the SDK, taken once: the service's credential and FCM headers
        (plus firebase-admin's metrics header, which its HTTP client adds to every request), the token
        request object of its session, and an aiohttp transport for the FCM host."""
        from firebase_admin import _http_client

        from channels._aiohttp import AioTransport

        if not all(hasattr(service, a) for a in ("_credential", "_fcm_headers", "_message_data",
                                                 "_handle_fcm_error")):
            raise ConfigurationError("this firebase-admin version lacks the message encoding we use: "
                                     "pin the tested version (see pyproject.toml)")
        self._credential = service._credential
        self._aio_headers = {**service._fcm_headers, **_http_client.METRICS_HEADERS,
                             "Content-Type": "application/json"}
        session = getattr(getattr(service, "_client", None), "session", None)
        request = getattr(session, "_auth_request", None)
        if request is None:  # pragma: no cover - only with an untested SDK version
            import google.auth.transport.requests as gar

            request = gar.Request()
        self._auth_request = request
        self._refresh_lock: asyncio.Lock | None = None
        self._aio = AioTransport(service._fcm_url, pool_size=self.config.pool_size, timeout_s=self.config.timeout_s)

    def build_message(self, message: OutboundMessage) -> messaging.Message:
        """The SDK ``Message`` for ``message`` (public for tests and previews)."""
        content = message.content
        if not isinstance(content, PushContent):
            raise TypeError(f"FirebasePushChannel cannot send {type(content).__name__}")
        data = {str(k): str(v) for k, v in content.data.items()}
        data[MESSAGE_ID_ARG] = message.message_id
        data[IDEMPOTENCY_KEY_ARG] = message.idempotency_key
        msg = self._messaging.Message(
            notification=self._messaging.Notification(title=content.title, body=content.body),
            data=data,
        )
        msg.token = message.to  # see the module docstring: token, not fid, without the deprecation path
        return msg

    def send(self, message: OutboundMessage) -> SendResult:
        import google.auth.exceptions as gauth
        from firebase_admin import exceptions as fx

        msg = self.build_message(message)
        try:
            name = self._service.send(msg)
        except fx.FirebaseError as exc:
            return self._from_firebase_error(exc, message)
        except gauth.RefreshError as exc:
            if getattr(exc, "retryable", False):
                return TransientFailure(reason=f"OAuth token endpoint unavailable: {type(exc).__name__}")
            raise ConfigurationError(f"FCM OAuth token refused ({exc.args[0] if exc.args else exc}): "
                                     f"check the service account in {ENV_CREDENTIALS}") from None
        except gauth.TransportError as exc:
            return TransientFailure(reason=f"OAuth token endpoint unreachable: {type(exc).__name__}")
        return Accepted(provider_message_id=name, status=200)

    async def send_async(self, message: OutboundMessage) -> SendResult:
        """:meth:`send` on the dispatcher's event loop: firebase-admin encodes the message (its
        ``_MessagingService`` message data and FCM headers, the credential's OAuth token) and maps the
        error answers (``_handle_fcm_error``, as its ``send`` does); aiohttp carries the request. A token
        refresh (about once an hour) runs in a thread, one at a time, so the loop never blocks on it."""
        import google.auth.exceptions as gauth
        from firebase_admin import exceptions as fx

        from channels._aiohttp import aiohttp_failure, transport_errors

        service = self._service
        data = service._message_data(self.build_message(message), False)
        body = json.dumps(data, allow_nan=False).encode("utf-8")  # as requests serialises ``json=``
        headers = dict(self._aio_headers)
        try:
            await self._fresh_token()
        except gauth.RefreshError as exc:
            if getattr(exc, "retryable", False):
                return TransientFailure(reason=f"OAuth token endpoint unavailable: {type(exc).__name__}")
            raise ConfigurationError(f"FCM OAuth token refused ({exc.args[0] if exc.args else exc}): "
                                     f"check the service account in {ENV_CREDENTIALS}") from None
        except gauth.TransportError as exc:
            return TransientFailure(reason=f"OAuth token endpoint unreachable: {type(exc).__name__}")
        self._credential.apply(headers)
        try:
            status, answer_headers, raw = await self._aio.request("POST", service._fcm_url, body=body,
                                                                  headers=headers)
        except transport_errors() as exc:
            return aiohttp_failure(exc)
        if status < 300:
            try:
                return Accepted(provider_message_id=str(json.loads(raw)["name"]), status=200)
            except (ValueError, KeyError, TypeError):
                return TransientFailure(reason=f"FCM answered {status} without a message name", status=status,
                                        ambiguous=True)
        error = service._handle_fcm_error(_http_error(status, answer_headers, raw, service._fcm_url))
        if not isinstance(error, fx.FirebaseError):  # pragma: no cover - the SDK always builds one
            return TransientFailure(reason=f"FCM {status}", status=status)
        return self._from_firebase_error(error, message)

    async def _fresh_token(self) -> None:
        """Refresh the OAuth token when it is missing or about to expire, in a thread (the refresh is a
        blocking request to the token endpoint) and once for all the exchanges waiting for it."""
        cred = self._credential
        if cred.valid:
            return
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            if not cred.valid:
                url = self._service._fcm_url
                await asyncio.get_running_loop().run_in_executor(
                    None, cred.before_request, self._auth_request, "POST", url, {})

    def _from_firebase_error(self, exc, message: OutboundMessage) -> SendResult:
        import requests
        from firebase_admin import exceptions as fx
        from firebase_admin import messaging

        from channels.base import transport_failure

        response = getattr(exc, "http_response", None)
        status = getattr(response, "status_code", None)
        detail = str(exc)[:500]
        cause = getattr(exc, "cause", None)
        if response is None and isinstance(cause, requests.RequestException):
            # No answer at all (firebase-admin wraps the transport error): whether FCM may have accepted
            # the message depends on where the request broke, exactly as for Twilio's requests session.
            return transport_failure(cause)
        if isinstance(exc, (messaging.UnregisteredError, messaging.SenderIdMismatchError)):
            # Both make the token useless to us: invalidate the device and fall back to another channel.
            log.info("FCM token %s of %s is no longer valid", redact(message.to), message.message_id)
            return PermanentFailure(FailureReason.UNREGISTERED_TOKEN, detail=detail, fallback=True, status=status,
                                    provider_code=type(exc).__name__)
        if isinstance(exc, (messaging.QuotaExceededError, fx.ResourceExhaustedError)):
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
            return TransientFailure(reason=f"FCM quota exceeded: {detail}", throttled=True,
                                    retry_after=retry_after, status=status)
        if isinstance(exc, (messaging.ThirdPartyAuthError, fx.UnauthenticatedError, fx.PermissionDeniedError)):
            raise ConfigurationError(f"FCM refused the credentials ({type(exc).__name__}): check {ENV_CREDENTIALS}"
                                     " and, for iOS/web, the APNs/web-push credentials in Firebase") from None
        if isinstance(exc, fx.NotFoundError):
            raise ConfigurationError(f"FCM answered NOT_FOUND for project {self.config.project_id!r}: check "
                                     f"{ENV_CREDENTIALS} and {ENV_BASE_URL}") from None
        if isinstance(exc, fx.InvalidArgumentError):
            if any(h in detail.lower() for h in _BAD_TOKEN_HINTS):
                return PermanentFailure(FailureReason.UNREGISTERED_TOKEN, detail=detail, fallback=True,
                                        status=status, provider_code="INVALID_ARGUMENT")
            return PermanentFailure(FailureReason.REJECTED, detail=detail, fallback=True, status=status,
                                    provider_code="INVALID_ARGUMENT")
        if isinstance(exc, (fx.UnavailableError, fx.InternalError, fx.DeadlineExceededError, fx.UnknownError,
                            fx.AbortedError, fx.CancelledError)):
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
            return TransientFailure(reason=f"FCM {type(exc).__name__}: {detail}", status=status,
                                    retry_after=retry_after, ambiguous=status in AMBIGUOUS_STATUSES)
        if status is not None and status >= 500:
            return TransientFailure(reason=f"FCM {status}: {detail}", status=status,
                                    ambiguous=status in AMBIGUOUS_STATUSES)
        return PermanentFailure(FailureReason.REJECTED, detail=detail, fallback=True, status=status,
                                provider_code=type(exc).__name__)

    def close(self) -> None:
        import firebase_admin

        aio = getattr(self, "_aio", None)
        if aio is not None:
            aio.close()
        try:
            firebase_admin.delete_app(self._app)
        except ValueError:
            pass  # already deleted


def _http_error(status: int, headers, body: bytes, url: str):
    """The ``requests.HTTPError`` firebase-admin's own transport raises for an error answer, built from
    aiohttp's answer so that the SDK's error mapping (``_handle_fcm_error``) reads the same fields."""
    import requests
    from requests.structures import CaseInsensitiveDict

    response = requests.Response()
    response.status_code = status
    response.headers = CaseInsensitiveDict(headers)
    response._content = body
    response.url = url
    response.encoding = "utf-8"
    return requests.HTTPError(f"{status} error from FCM", response=response)
