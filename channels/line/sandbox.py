"""The LINE Messaging API as the provider sandbox speaks it, and the signed webhooks of simulated LINE users.

Endpoints (as ``line-bot-sdk`` v3 calls them, Bearer channel access token):

* ``POST /v2/bot/message/push`` and ``POST /v2/bot/message/multicast``: 200 with ``sentMessages`` (push) or
  ``{}`` (multicast), one record per recipient; ``X-Line-Retry-Key`` honoured like LINE: a key that an
  accepted request carried less than 24 hours ago (:data:`RETRY_KEY_VALIDITY_S`, on the injectable
  :attr:`LineSandbox.clock`) answers 409 with ``X-Line-Accepted-Request-Id`` and sends nothing again,
  whatever the body; a key whose request was refused (4xx, 5xx, 429) stays free; an older key is a new
  request. 400 blaming ``to`` for a user id that is not
  ``U`` + 32 hex digits or is listed in ``line_invalid_user_ids``; 400 for a text over 5,000 characters or
  more than 5 messages; 429 with ``Retry-After`` when rate limited, and 429 "You have reached your monthly
  limit." once ``line_quota`` messages were sent.
* ``GET /v2/bot/message/quota`` and ``GET /v2/bot/message/quota/consumption``.

Webhooks (``POST {webhook_url}/webhooks/line``, ``X-Line-Signature`` under ``line_channel_secret``):
``follow``, ``unfollow``, ``message`` and ``postback`` events built by :func:`webhook_event`. Simulated
users: a click taps the Flex message's postback action (its data carries our message id), an unsubscribe
either blocks the account (unfollow) or writes "取消" (one or the other, drawn from the seed); a control call
(``POST /sandbox/line/events``) makes a user follow or write a message.

The request pipeline (latency, faults, rate limit, recording) is the sandbox's (``membercare/sandbox/app.py``,
``pipeline.py``); :class:`LineSandbox` is LINE's endpoints class, registered by ``SandboxApp.build`` beside
the other providers'.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from channels.line.adapter import ACCEPTED_REQUEST_HEADER, TEXT_MAX
from channels.line.events import POSTBACK_MESSAGE_ID

if TYPE_CHECKING:
    from aiohttp import web

    from membercare.sandbox.app import SandboxApp

PUSH_PATH = "/v2/bot/message/push"
MULTICAST_PATH = "/v2/bot/message/multicast"
QUOTA_PATH = "/v2/bot/message/quota"
CONSUMPTION_PATH = "/v2/bot/message/quota/consumption"
REPLY_PATH = "/v2/bot/message/reply"
LINK_TOKEN_PATH = "/v2/bot/user/{userId}/linkToken"
DIALOG_PATH = "/dialog/bot/accountLink"
LINK_TOKEN_TTL_S = 600.0
USER_ID = re.compile(r"^U[0-9a-f]{32}$")
MAX_MESSAGES = 5
# LINE keeps a retry key for 24 hours after the request that carried it.
RETRY_KEY_VALIDITY_S = 24 * 3600.0


def line_error(message: str, details: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return body


def invalid_user() -> dict[str, Any]:
    return line_error("The property, 'to', in the request body is invalid (line: -, column: -)",
                      [{"message": "invalid user id", "property": "to"}])


def validate_messages(body: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(messages, None)`` when LINE would take them, else ``(None, LINE's 400 message)``."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        return None, f"Size must be between 1 and {MAX_MESSAGES}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("type") not in ("text", "flex"):
            return None, f"The property, 'messages[{i}].type', in the request body is invalid"
        if m["type"] == "text" and not (isinstance(m.get("text"), str) and 0 < len(m["text"]) <= TEXT_MAX):
            return None, f"Length must be between 1 and {TEXT_MAX}: messages[{i}].text"
        if m["type"] == "flex" and not (isinstance(m.get("contents"), dict) and m.get("altText")):
            return None, f"The property, 'messages[{i}].contents' or 'altText', in the request body is invalid"
    return messages, None


def postback_message_id(messages: list[dict[str, Any]]) -> str | None:
    """Our message id from the first postback action of a Flex message (``data`` ``mid=...``)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if found:
            return
        if isinstance(node, dict):
            action = node.get("action")
            if isinstance(action, dict) and action.get("type") == "postback" and isinstance(action.get("data"), str):
                values = parse_qs(action["data"]).get(POSTBACK_MESSAGE_ID)
                if values:
                    found.append(values[0])
                    return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk([m.get("contents") for m in messages if m.get("type") == "flex"])
    return found[0] if found else None


def webhook_event(kind: str, user_id: str, *, event_id: str, at: float, text: str | None = None,
                  postback_data: str | None = None, redelivery: bool = False,
                  link: dict[str, str] | None = None) -> dict[str, Any]:
    """One LINE webhook event of ``kind`` (follow, unfollow, message, postback, accountLink with ``link``
    ``{"result": "ok"|"failed", "nonce": ...}``) from ``user_id``."""
    event: dict[str, Any] = {"type": kind, "mode": "active", "timestamp": int(at * 1000),
                             "source": {"type": "user", "userId": user_id}, "webhookEventId": event_id,
                             "deliveryContext": {"isRedelivery": redelivery}}
    if kind in ("follow", "message", "postback", "accountLink"):
        event["replyToken"] = uuid.uuid5(uuid.NAMESPACE_URL, event_id).hex
    if kind == "follow":
        event["follow"] = {"isUnblocked": False}
    elif kind == "message":
        event["message"] = {"id": str(int(uuid.uuid5(uuid.NAMESPACE_OID, event_id).int % 10**18)), "type": "text",
                            "quoteToken": event_id, "text": text or ""}
    elif kind == "postback":
        event["postback"] = {"data": postback_data or ""}
    elif kind == "accountLink":
        event["link"] = dict(link or {})
    return event


def webhook_body(destination: str, events: list[dict[str, Any]]) -> bytes:
    return json.dumps({"destination": destination, "events": events}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


class LineSandbox:
    """The Messaging API handlers, run inside one :class:`~membercare.sandbox.server.SandboxApp`."""

    def __init__(self, app: SandboxApp, clock: Callable[[], float] = time.time):
        self.app = app
        # X-Line-Retry-Key -> (the id of the request that was accepted with it, when, on ``clock``)
        self.retry_keys: dict[str, tuple[str, float]] = {}
        self.consumed = 0  # messages sent this "month" (since the last reset)
        # When "now" is for the retry keys' 24 h (seconds since the epoch). Tests replace it (through
        # ``SandboxServer.call``) to move past the window without waiting.
        self.clock = self._initial_clock = clock

    def accepted_request(self, key: str) -> str | None:
        """The id of the request accepted with retry key ``key`` in the last 24 hours, else ``None``."""
        seen = self.retry_keys.get(key)
        if seen is None:
            return None
        if self.clock() - seen[1] >= RETRY_KEY_VALIDITY_S:
            del self.retry_keys[key]  # expired: LINE treats the key as never seen
            return None
        return seen[0]

    def routes(self) -> list[web.RouteDef]:
        from aiohttp import web

        return [web.post(PUSH_PATH, self.push), web.post(MULTICAST_PATH, self.multicast),
                web.get(QUOTA_PATH, self.quota), web.get(CONSUMPTION_PATH, self.consumption),
                web.post("/sandbox/line/events", self.user_event)]

    def reset(self) -> None:
        self.retry_keys.clear()
        self.consumed = 0
        self.clock = self._initial_clock

    def _authorised(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        allowed = self.app.config.line_access_tokens
        return bool(token) and (not allowed or token in allowed)

    async def push(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, multicast=False)

    async def multicast(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, multicast=True)

    async def _send(self, request: web.Request, *, multicast: bool) -> web.StreamResponse:
        from aiohttp import web

        from membercare.sandbox.pipeline import GHOST, Fault, drop
        from membercare.sandbox.state import MessageRecord, stable_id

        app, raw = self.app, await request.read()
        app.capture(request, raw)
        app.state.stats.requests["line"] += 1
        if not self._authorised(request):
            app.reject("line", "unauthorized")
            return web.json_response(line_error("Authentication failed. Confirm that the access token in the "
                                                "authorization header is valid."), status=401)
        key = request.headers.get("X-Line-Retry-Key")
        if key is not None:
            try:
                uuid.UUID(key)
            except ValueError:
                return web.json_response(line_error("The value for the 'X-Line-Retry-Key' header is invalid"),
                                         status=400)
            accepted = self.accepted_request(key)
            if accepted is not None:
                app.state.stats.events["line.retry_key_conflict"] += 1
                return web.json_response(line_error("The retry key is already accepted"), status=409,
                                         headers={ACCEPTED_REQUEST_HEADER: accepted})
        gate = await app.gate(request, "line", raw)
        if isinstance(gate, Fault):
            kind, value = gate
            if kind == "throttled":
                return web.json_response(line_error("The API rate limit has been exceeded. Try again later."),
                                         status=429, headers={"Retry-After": str(value)})
            return web.json_response(line_error("Internal server error" if value == 500 else "Service unavailable"),
                                     status=value)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        messages, error = validate_messages(body)
        if error or messages is None or not isinstance(body, dict):
            app.reject("line", "invalid_payload")
            return web.json_response(line_error(error or "The request body has 1 error(s)"), status=400)
        targets = body.get("to")
        targets = targets if multicast and isinstance(targets, list) else [targets]
        if not targets or any(not isinstance(t, str) or not USER_ID.match(t) or t in app.config.line_invalid_user_ids
                              for t in targets):
            app.reject("line", "invalid_recipient")
            return web.json_response(invalid_user(), status=400)
        quota = app.config.line_quota
        # LINE counts one message per recipient and request, however many message objects it holds.
        if quota is not None and self.consumed + len(targets) > quota:
            app.reject("line", "quota")
            return web.json_response(line_error("You have reached your monthly limit."), status=429)
        self.consumed += len(targets)
        request_id = str(uuid.uuid5(uuid.NAMESPACE_OID, stable_id(app.config.seed, "line-req", app.state.seq + 1)))
        if key is not None:
            self.retry_keys[key] = (request_id, self.clock())
        mid = postback_message_id(messages)
        sent = []
        for user in targets:
            seq = app.state.next_seq()
            ids = [str(int(stable_id(app.config.seed, "line", seq, i, length=15), 16)) for i in range(len(messages))]
            sent = [{"id": i, "quoteToken": stable_id(app.config.seed, "lq", i)} for i in ids]
            rec = MessageRecord(seq=seq, channel="line", provider_id=ids[0], message_id=mid, idempotency_key=key,
                                to=user, accepted_at=time.time(), account="line", ghost=gate is GHOST,
                                attributes={"channel": "line"}, extra={"messages": messages, "request_id": request_id})
            app.accept(rec)
        if gate is GHOST:
            drop(request)
        return web.json_response({} if multicast else {"sentMessages": sent},
                                 headers={"X-Line-Request-Id": request_id})

    async def quota(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        if not self._authorised(request):
            return web.json_response(line_error("Authentication failed."), status=401)
        self.app.state.stats.lookups["line"] += 1
        limit = self.app.config.line_quota
        return web.json_response({"type": "none"} if limit is None else {"type": "limited", "value": limit})

    async def consumption(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        if not self._authorised(request):
            return web.json_response(line_error("Authentication failed."), status=401)
        self.app.state.stats.lookups["line"] += 1
        return web.json_response({"totalUsage": self.consumed})

    async def user_event(self, request: web.Request) -> web.StreamResponse:
        """``POST /sandbox/line/events`` ``{"type": "follow"|"unfollow"|"message"|"postback", "userId": ...,
        "text"?, "data"?}``: a simulated user does it now; the signed webhook is posted (202)."""
        from aiohttp import web

        try:
            body = await request.json()
            kind, user = body["type"], body["userId"]
            if kind not in ("follow", "unfollow", "message", "postback") or not USER_ID.match(user):
                raise ValueError("type must be follow, unfollow, message or postback and userId a LINE user id")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not self.app.recipients.line_user_event(kind, user, text=body.get("text"), data=body.get("data")):
            return web.json_response({"error": "no LINE webhook URL or channel secret configured"}, status=409)
        return web.json_response({"ok": True}, status=202)


class LineLinkSandbox:
    """LINE's account-link endpoints and the reply API, beside :class:`LineSandbox` in one
    :class:`~membercare.sandbox.server.SandboxApp` (same access tokens, same webhook target):

    * ``POST /v2/bot/user/{userId}/linkToken``: a link token for a valid user id, valid 10 minutes, once;
    * ``POST /v2/bot/message/reply``: a reply token is accepted once (400 "Invalid reply token" after);
      replies are kept apart from pushes (``GET /sandbox/line/replies``), free like LINE's (not counted in
      the quota) and draw no simulated engagement;
    * ``GET /dialog/bot/accountLink?linkToken=&nonce=``: LINE's account-link dialog (``access.line.me``) as if
      the user confirmed it: the signed ``accountLink`` webhook is posted, and its receipt awaited, before the
      answer; ``result`` ``ok`` for a link token issued here and unused for under 10 minutes, ``failed`` for a
      used or expired one (400 and no webhook for a token never issued: LINE would not know the user).
    """

    def __init__(self, app: SandboxApp):
        self.app = app
        self.link_tokens: dict[str, tuple[str, float, bool]] = {}  # token -> (user id, issued at, used)
        self.used_reply_tokens: set[str] = set()
        self.replies: list[dict[str, Any]] = []
        self.account_links = 0

    def routes(self) -> list[web.RouteDef]:
        from aiohttp import web

        return [web.post(REPLY_PATH, self.reply), web.post(LINK_TOKEN_PATH, self.link_token),
                web.get(DIALOG_PATH, self.account_link_dialog), web.get("/sandbox/line/replies", self.get_replies)]

    def reset(self) -> None:
        self.link_tokens.clear()
        self.used_reply_tokens.clear()
        self.replies.clear()

    def _authorised(self, request: web.Request) -> bool:
        return self.app.line._authorised(request)

    async def link_token(self, request: web.Request) -> web.StreamResponse:
        """``POST /v2/bot/user/{userId}/linkToken``: a fresh link token for the user (LINE's are 32 characters)."""
        from aiohttp import web

        if not self._authorised(request):
            return web.json_response(line_error("Authentication failed."), status=401)
        user = request.match_info["userId"]
        if not USER_ID.match(user) or user in self.app.config.line_invalid_user_ids:
            return web.json_response(line_error("The user ID is invalid"), status=400)
        token = secrets.token_urlsafe(24)[:32]
        self.link_tokens[token] = (user, time.time(), False)
        self.app.state.stats.lookups["line"] += 1
        return web.json_response({"linkToken": token})

    async def reply(self, request: web.Request) -> web.StreamResponse:
        """``POST /v2/bot/message/reply``: each reply token once; kept in :attr:`replies`."""
        from aiohttp import web

        if not self._authorised(request):
            return web.json_response(line_error("Authentication failed."), status=401)
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        messages, error = validate_messages(body)
        if error or messages is None or not isinstance(body, dict):
            return web.json_response(line_error(error or "The request body has 1 error(s)"), status=400)
        token = body.get("replyToken")
        if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{32}", token) or token in self.used_reply_tokens:
            return web.json_response(line_error("Invalid reply token"), status=400)
        self.used_reply_tokens.add(token)
        self.replies.append({"replyToken": token, "messages": messages, "at": time.time()})
        return web.json_response({"sentMessages": [{"id": str(len(self.replies)), "quoteToken": token}]})

    async def get_replies(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response(self.replies)

    async def account_link_dialog(self, request: web.Request) -> web.StreamResponse:
        """LINE's account-link dialog, confirmed at once: the signed ``accountLink`` event is posted and its
        receipt awaited; the answer says which result was sent and whether the receiver took it."""
        from aiohttp import web

        from membercare.sandbox.state import stable_id

        token, nonce = request.query.get("linkToken", ""), request.query.get("nonce", "")
        issued = self.link_tokens.get(token)
        if issued is None or not nonce:
            return web.json_response({"error": "unknown link token or no nonce"}, status=400)
        user, at, used = issued
        ok = not used and time.time() - at < LINK_TOKEN_TTL_S
        self.link_tokens[token] = (user, at, True)
        self.account_links += 1
        event_id = stable_id(self.app.config.seed, "line-link", token, self.account_links)[:26].upper()
        event = webhook_event("accountLink", user, event_id=event_id, at=time.time(),
                              link={"result": "ok" if ok else "failed", "nonce": nonce})
        posted = await self.app.recipients.post_line_now([event], "line.accountLink")
        return web.json_response({"result": "ok" if ok else "failed", "webhook_delivered": posted},
                                 status=200 if posted else 502)
