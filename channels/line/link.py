"""LINE's side of the account-link flow ("Linking user accounts" of the Messaging API).

The flow, end to end (the receiver's side is :mod:`membercare.receiver.line_link`):

1. a LINE user asks to link (writes 綁定 / "link" to the account, or follows it while unlinked);
2. the receiver issues a link token for that user id (``POST /v2/bot/user/{userId}/linkToken``,
   :meth:`LineLinkClient.issue_link_token`; valid 10 minutes, once) and replies with the shop's login
   page carrying it (:func:`login_link`: ``MEMBERCARE_LINE_LOGIN_URL?linkToken=...``);
3. the shop authenticates the member and asks the receiver for a nonce (``POST /line/link``, or our signed
   member link ``/u/{token}/line``); the receiver stores nonce -> member and redirects the browser to
   LINE's dialog (:func:`dialog_url`: ``https://access.line.me/dialog/bot/accountLink?linkToken=&nonce=``);
4. LINE posts an ``accountLink`` webhook event (``link.result`` ``ok`` or ``failed``, ``link.nonce``) from
   that user; the receiver spends the nonce once and sets the member's ``line_user_id``.

``MEMBERCARE_LINE_ACCOUNT_LINK_URL`` replaces LINE's dialog URL (the provider sandbox serves one at
``/dialog/bot/accountLink``); ``MEMBERCARE_LINE_LOGIN_URL`` is the shop's login page. The link prompt is a
reply (free, not counted against the monthly quota) when the event has a reply token, else a push.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from channels.base import DEFAULT_TIMEOUT_S, redact
from channels.line.adapter import DEFAULT_BASE_URL, LineConfig, retry_key

log = logging.getLogger(__name__)

ENV_LOGIN_URL = "MEMBERCARE_LINE_LOGIN_URL"
ENV_ACCOUNT_LINK_URL = "MEMBERCARE_LINE_ACCOUNT_LINK_URL"
ACCOUNT_LINK_URL = "https://access.line.me/dialog/bot/accountLink"
LINK_TOKEN_PARAM = "linkToken"
LINK_TOKEN_TTL_S = 600  # LINE: a link token is valid for 10 minutes and can be used once
MAX_LINK_TOKEN = 128  # LINE's are 32 characters; anything much longer is not one


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))


def login_link(login_url: str, link_token: str) -> str:
    """The shop's login page with the link token (``?linkToken=``), as the prompt carries it."""
    return _with_query(login_url, {LINK_TOKEN_PARAM: link_token})


def dialog_url(link_token: str, nonce: str, base: str = ACCOUNT_LINK_URL) -> str:
    """LINE's account-link dialog for ``link_token`` and our ``nonce`` (where the member's browser goes)."""
    return _with_query(base, {LINK_TOKEN_PARAM: link_token, "nonce": nonce})


def usable_link_token(value: str | None) -> str | None:
    """``value`` when it can be a LINE link token (URL-safe characters, bounded), else ``None``."""
    if not value or len(value) > MAX_LINK_TOKEN:
        return None
    return value if all(c.isascii() and (c.isalnum() or c in "-_") for c in value) else None


class LineLinkClient:
    """Link tokens and the link prompt, on ``line-bot-sdk`` (``MessagingApi``) with the channel's token."""

    def __init__(self, config: LineConfig, timeout_s: float = DEFAULT_TIMEOUT_S):
        from linebot.v3.messaging import ApiClient, Configuration, MessagingApi

        sdk_config = Configuration(host=config.base_url or DEFAULT_BASE_URL, access_token=config.channel_access_token)
        sdk_config.retries = False
        self.timeout_s = timeout_s
        self._client = ApiClient(sdk_config)
        self._api = MessagingApi(self._client)

    def issue_link_token(self, user_id: str) -> str:
        """A link token for ``user_id`` (``POST /v2/bot/user/{userId}/linkToken``); the SDK's
        ``ApiException`` or a urllib3 error when LINE refuses or cannot be reached."""
        return str(self._api.issue_link_token(user_id, _request_timeout=self.timeout_s).link_token)

    def send_text(self, user_id: str, text: str, *, reply_token: str | None, key: str) -> str:
        """Send ``text`` to ``user_id``: a reply when there is a reply token (free), else a push with the
        retry key of ``key``. Returns ``"reply"`` or ``"push"``; raises like :meth:`issue_link_token`."""
        from linebot.v3.messaging import PushMessageRequest, ReplyMessageRequest, TextMessage
        from linebot.v3.messaging.exceptions import ApiException

        messages = [TextMessage(text=text)]
        if reply_token:
            try:
                self._api.reply_message(ReplyMessageRequest(reply_token=reply_token, messages=messages),
                                        _request_timeout=self.timeout_s)
                return "reply"
            except ApiException as exc:
                # An expired or used reply token (a redelivered event, a slow answer): 400. Push instead.
                if exc.status != 400:
                    raise
                log.info("LINE refused the reply token for %s (400): pushing the link prompt", redact(user_id))
        try:
            self._api.push_message(PushMessageRequest(to=user_id, messages=messages),
                                   x_line_retry_key=retry_key(key), _request_timeout=self.timeout_s)
        except ApiException as exc:
            if exc.status != 409:  # 409: this retry key was accepted before, the prompt is already out
                raise
        return "push"

    def close(self) -> None:
        self._client.rest_client.pool_manager.clear()
