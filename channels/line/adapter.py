"""LINE pushes through the Messaging API, on the official ``line-bot-sdk`` (v3, ``linebot.v3.messaging``).

Configuration (:class:`LineConfig`, from the environment or a Prefect Secret block):

``MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN``  required; the Messaging API channel's long-lived access token,
                                         never logged
``MEMBERCARE_LINE_CHANNEL_SECRET``       the channel secret that signs LINE's webhooks (read by the
                                         receiver; not needed to send)
``MEMBERCARE_LINE_BASE_URL``             optional; unset means the real API (``https://api.line.me``).
                                         Tests and the demo point it at the provider sandbox.

**Idempotency.** Every push carries ``X-Line-Retry-Key``, LINE's own idempotency for retried requests: a
UUID derived from our outbox idempotency key (:func:`retry_key`), so a retry of the same outbox row, from
any process, presents the same key. LINE answers a retried key it already accepted with 409 and the
accepted request's id in ``X-Line-Accepted-Request-Id``: that message *was* sent, so it is
:class:`Accepted`, never a failure.

**Our ids.** A push request has no custom arguments, and LINE reports nothing per message (no delivery or
read events for pushes). The sent message ids LINE returns are the provider id; our message id travels in
the Flex message's postback data (``mid=<message id>``, written by the template) and in our tracked short
links, which is how taps come back as events.

Error mapping:

========================================================  ===============================================
LINE answer                                               result
========================================================  ===============================================
200                                                       ``Accepted`` (first sent message id)
409 (retry key already accepted)                          ``Accepted`` (the accepted request id)
429 (rate limit, or the monthly quota reached)            ``TransientFailure(throttled, Retry-After)``
400 blaming ``to`` (not a valid user id of this channel)  ``PermanentFailure(INVALID_RECIPIENT)``
other 400 (content: text over 5,000 characters, a Flex    ``PermanentFailure(REJECTED)``
container LINE refuses)
401, 403                                                  raises ``ConfigurationError`` (token)
404 on the push endpoint                                  raises ``ConfigurationError`` (base URL)
500, 503; 502, 504 (ambiguous)                            ``TransientFailure``
transport errors                                          :func:`channels.base.urllib3_failure`
========================================================  ===============================================

Transport: the SDK's own urllib3 pool (``RESTClientObject``), sized ``pool_size`` with urllib3 retries
off (the delivery engine retries) and one timeout per request. The SDK logs response bodies at DEBUG
(message ids only) and never the request headers, so the token is not logged.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from channels.base import (
    DEFAULT_TIMEOUT_S,
    Accepted,
    Channel,
    ConfigurationError,
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
    urllib3_failure,
)
from membercare.delivery.contract import LineContent

log = logging.getLogger(__name__)

ENV_ACCESS_TOKEN = "MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN"
ENV_CHANNEL_SECRET = "MEMBERCARE_LINE_CHANNEL_SECRET"
ENV_BASE_URL = "MEMBERCARE_LINE_BASE_URL"
DEFAULT_BASE_URL = "https://api.line.me"
ACCEPTED_REQUEST_HEADER = "X-Line-Accepted-Request-Id"
TEXT_MAX = 5000  # LINE: a text message holds at most 5,000 characters
MULTICAST_MAX = 500  # LINE: at most 500 user ids per multicast
# A fixed namespace: the same outbox key always gives the same retry key, in every process and release.
RETRY_KEY_NAMESPACE = uuid.UUID("5f1d7a52-2c0e-4c0b-9a57-1f5a4a8e6c11")
AMBIGUOUS_STATUSES = frozenset({502, 504})


def retry_key(idempotency_key: str) -> str:
    """The ``X-Line-Retry-Key`` for an outbox idempotency key (a UUID, as LINE requires)."""
    return str(uuid.uuid5(RETRY_KEY_NAMESPACE, idempotency_key))


@dataclass(frozen=True)
class LineConfig:
    channel_access_token: str = field(repr=False)
    base_url: str | None = None  # None: the real LINE API
    timeout_s: float = DEFAULT_TIMEOUT_S
    pool_size: int = 128  # keep-alive connections, opened lazily: at least the dispatcher's worker threads

    def __post_init__(self) -> None:
        if not self.channel_access_token:
            raise ConfigurationError(f"{ENV_ACCESS_TOKEN} is empty")
        object.__setattr__(self, "base_url", normalise_base_url(self.base_url, ENV_BASE_URL))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LineConfig:
        return cls(channel_access_token=require(env, ENV_ACCESS_TOKEN), base_url=optional(env, ENV_BASE_URL))


@dataclass(frozen=True)
class Quota:
    """This month's message quota: ``limit`` (``None``: no limit set) and ``used`` (messages sent)."""

    limit: int | None
    used: int

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


def line_messages(content: LineContent) -> list:
    """The SDK message objects for one content: the text, then the Flex message when there is one."""
    from linebot.v3.messaging import FlexContainer, FlexMessage, TextMessage

    messages: list = [TextMessage(text=content.text)]
    if content.flex_json:
        messages.append(FlexMessage(alt_text=content.alt_text or content.text[:400],
                                    contents=FlexContainer.from_json(content.flex_json)))
    return messages


class LineChannel:
    """:class:`~membercare.delivery.contract.ChannelAdapter` for LINE push messages."""

    channel = Channel.LINE

    def __init__(self, config: LineConfig):
        from linebot.v3.messaging import ApiClient, Configuration, MessagingApi

        self.config = config
        sdk_config = Configuration(host=config.base_url or DEFAULT_BASE_URL, access_token=config.channel_access_token)
        sdk_config.retries = False
        sdk_config.connection_pool_maxsize = config.pool_size
        self._client = ApiClient(sdk_config)
        self._api = MessagingApi(self._client)

    def send(self, message: OutboundMessage) -> SendResult:
        from linebot.v3.messaging import PushMessageRequest

        content = message.content
        if not isinstance(content, LineContent):
            raise TypeError(f"LineChannel cannot send {type(content).__name__}")
        try:
            request = PushMessageRequest(to=message.to, messages=line_messages(content))
        except ValueError as exc:  # the SDK's models refuse the content (a malformed Flex container)
            return PermanentFailure(FailureReason.REJECTED, detail=f"LINE message refused by the SDK: {exc}"[:500])
        return self._call(lambda: self._api.push_message(request, x_line_retry_key=retry_key(message.idempotency_key),
                                                         _request_timeout=self.config.timeout_s),
                          message.to, message.message_id)

    def multicast(self, user_ids: Sequence[str], content: LineContent, idempotency_key: str) -> SendResult:
        """One content to up to 500 users in one request (``POST /v2/bot/message/multicast``), with the retry
        key of ``idempotency_key``. LINE returns no message ids for a multicast: ``Accepted`` carries the
        retry key (``Accepted.status`` 409 when LINE had accepted that key before)."""
        from linebot.v3.messaging import MulticastRequest

        if not 1 <= len(user_ids) <= MULTICAST_MAX:
            raise ValueError(f"a multicast goes to 1 to {MULTICAST_MAX} users, not {len(user_ids)}")
        request = MulticastRequest(to=list(user_ids), messages=line_messages(content))
        key = retry_key(idempotency_key)
        result = self._call(lambda: self._api.multicast(request, x_line_retry_key=key,
                                                        _request_timeout=self.config.timeout_s),
                            f"{len(user_ids)} users", idempotency_key)
        # 409: a request with this key was accepted before (nothing sent again); the status tells it apart.
        return Accepted(provider_message_id=key, status=result.status) if isinstance(result, Accepted) else result

    max_batch = MULTICAST_MAX  # channels.base.BatchSender

    def send_many(self, messages: Sequence[OutboundMessage], batch_key: str) -> list[SendResult | None]:
        """:class:`channels.base.BatchSender`: the dispatcher's rows of one content as one multicast, its
        ``X-Line-Retry-Key`` derived from ``batch_key`` (the same rows give the same key, so a retried or
        reconciled batch is not delivered twice). One result per message; ``None`` for every message when
        LINE refused the whole request because of one user id (it does not say which): nothing was sent,
        and the dispatcher sends each of them on its own."""
        first = messages[0].content if messages else None
        if not isinstance(first, LineContent) or any(m.content != first for m in messages):
            raise TypeError("LineChannel.send_many sends one LineContent to every message")
        try:
            result = self.multicast([m.to for m in messages], first, batch_key)
        except ValueError as exc:  # the SDK's models refuse the content (a malformed Flex container)
            result = PermanentFailure(FailureReason.REJECTED, detail=f"LINE message refused by the SDK: {exc}"[:500])
        if isinstance(result, PermanentFailure) and result.reason is FailureReason.INVALID_RECIPIENT:
            return [None] * len(messages)
        return [result] * len(messages)

    def quota(self) -> Quota:
        """This month's quota (``GET /v2/bot/message/quota`` and ``/quota/consumption``); raises
        :class:`~membercare.delivery.provider_records.ProviderLookupError` when LINE cannot be read."""
        from linebot.v3.messaging.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        from membercare.delivery.provider_records import ProviderLookupError

        try:
            limit = self._api.get_message_quota(_request_timeout=self.config.timeout_s)
            used = self._api.get_message_quota_consumption(_request_timeout=self.config.timeout_s)
        except ApiException as exc:
            if exc.status in (401, 403):
                raise ConfigurationError(
                    f"LINE refused the access token ({exc.status}): check {ENV_ACCESS_TOKEN}") from None
            raise ProviderLookupError(f"LINE quota lookup failed (HTTP {exc.status})") from None
        except HTTPError as exc:
            raise ProviderLookupError(f"LINE quota lookup failed ({type(exc).__name__})") from None
        kind = str(getattr(limit.type, "value", limit.type))
        return Quota(limit=limit.value if kind == "limited" else None, used=int(used.total_usage))

    def _call(self, send, to: str, ref: str) -> SendResult:
        from linebot.v3.messaging.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = send()
        except ApiException as exc:
            return self._from_api_error(exc, to, ref)
        except HTTPError as exc:
            return urllib3_failure(exc)
        sent = getattr(response, "sent_messages", None) or []
        return Accepted(provider_message_id=str(sent[0].id) if sent else "", status=200)

    def _from_api_error(self, exc, to: str, ref: str) -> SendResult:
        status = int(exc.status or 0)
        headers = exc.headers or {}
        message, details = _error_body(exc.body)
        detail = f"LINE {status}: {message}"[:500]
        if status == 409:
            accepted = headers.get(ACCEPTED_REQUEST_HEADER) or headers.get(ACCEPTED_REQUEST_HEADER.lower()) or ""
            return Accepted(provider_message_id=accepted, status=409)
        if status in (401, 403):
            raise ConfigurationError(f"LINE refused the channel access token ({status}): check {ENV_ACCESS_TOKEN}")
        if status == 404:
            raise ConfigurationError(f"LINE answered 404 on the push endpoint: check {ENV_BASE_URL}")
        if status == 429:
            return TransientFailure(reason=detail, throttled=True, status=status,
                                    retry_after=parse_retry_after(headers.get("Retry-After")))
        if status == 0 or status >= 500 or status == 408:
            return TransientFailure(reason=detail, status=status or None, ambiguous=status in AMBIGUOUS_STATUSES)
        if status == 400 and ("to" in details or "'to'" in message):
            log.info("LINE refused user %s for %s: invalid user id", redact(to), ref)
            return PermanentFailure(FailureReason.INVALID_RECIPIENT, detail=detail, fallback=True, status=status)
        return PermanentFailure(FailureReason.REJECTED, detail=detail, fallback=True, status=status)

    def close(self) -> None:
        self._client.rest_client.pool_manager.clear()


def _error_body(body) -> tuple[str, set[str]]:
    """LINE's error ``message`` and the ``property`` names its ``details`` blame (``{"to"}``)."""
    try:
        data = json.loads(body) if body else {}
    except (TypeError, ValueError):
        return "", set()
    if not isinstance(data, dict):
        return "", set()
    details: list[Any] = data["details"] if isinstance(data.get("details"), list) else []
    props = {str(d.get("property")) for d in details if isinstance(d, dict) and d.get("property")}
    return str(data.get("message") or ""), props
