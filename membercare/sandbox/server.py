"""The sandbox HTTP server (aiohttp): the four provider APIs plus ``/sandbox/*`` control endpoints.

Each provider's wire format (request validation, answer and error bodies) lives in its folder
(``channels/<provider>/sandbox.py``); this module runs the shared request pipeline around it.

Why aiohttp: one process serves thousands of requests per second on one core (llhttp parser; uvloop when
installed), a handler can drop its connection for fault injection (ASGI servers cannot), and its client
posts the simulated webhooks on the same loop.

Request pipeline per provider call: credentials check -> latency -> fault draw (5xx, timeout, dropped
connection, ghost) -> rate limit (429 + Retry-After) -> payload validation (the provider's own 4xx) ->
accept (record, answer, schedule simulated recipient). Only accepted messages are recorded; faults other
than "ghost" happen *before* acceptance, so a retried fault can never create a duplicate by itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import secrets
import signal
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from aiohttp import web

from channels.base import (
    CALLBACK_IDEMPOTENCY_KEY_PARAM,
    CALLBACK_MESSAGE_ID_PARAM,
    IDEMPOTENCY_KEY_ARG,
    MESSAGE_ID_ARG,
)
from channels.fcm import sandbox as fcm_wire
from channels.line.sandbox import LineSandbox
from channels.sendgrid import sandbox as sendgrid_wire
from channels.sendgrid.webhooks import SendGridWebhookSigner
from channels.twilio import sandbox as twilio_wire
from membercare.sandbox.config import CHANNELS, ConfigError, SandboxConfig, apply_patch
from membercare.sandbox.recipients import EngagementModel, EventClock, Recipients
from membercare.sandbox.state import MessageRecord, SandboxState, TokenBucket, seeded_rng, stable_id

log = logging.getLogger(__name__)

TOKEN_PATH = "/token"
_DROP = object()


class _Ghost:
    """Marker: accept the message, then drop the connection instead of answering."""


class SandboxApp:
    """State, configuration and handlers of one sandbox. ``build()`` returns the aiohttp application."""

    def __init__(self, config: SandboxConfig | None = None, *, model: EngagementModel | None = None,
                 clock: EventClock | None = None):
        self.initial_config = config or SandboxConfig()
        self.config = self.initial_config.validate()
        self.state = SandboxState()
        self.signer = SendGridWebhookSigner.from_seed(self.config.seed)
        self.initial_clock = clock
        self.recipients = Recipients(lambda: self.config, self.state, model, self.signer, clock)
        # OAuth access tokens outlive /sandbox/reset: clients cache them for an hour.
        self.fcm_access_tokens: dict[str, str] = {}
        self.line = LineSandbox(self)  # LINE's Messaging API (channels/line/sandbox.py)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024**2)
        r = app.router
        r.add_post("/v3/mail/send", self.sendgrid_send)
        r.add_post("/2010-04-01/Accounts/{account_sid}/Messages.json", self.twilio_create)
        r.add_get("/2010-04-01/Accounts/{account_sid}/Messages.json", self.twilio_list)
        r.add_post("/v1/projects/{project}/messages:send", self.fcm_send)
        r.add_post(TOKEN_PATH, self.fcm_token)
        self.line.add_routes(r)
        r.add_get("/sandbox/health", self.health)
        r.add_get("/sandbox/messages", self.get_messages)
        r.add_get("/sandbox/stats", self.get_stats)
        r.add_get("/sandbox/config", self.get_config)
        r.add_post("/sandbox/config", self.post_config)
        r.add_post("/sandbox/reset", self.post_reset)
        r.add_post("/sandbox/drain", self.post_drain)
        r.add_get("/sandbox/requests", self.get_requests)
        r.add_get("/sandbox/keys", self.get_keys)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.recipients.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.recipients.stop()

    # ------------------------------------------------------------------ control API (Python)

    def reconfigure(self, patch: dict[str, Any]) -> SandboxConfig:
        new = apply_patch(self.config, patch)
        if new.seed != self.config.seed:
            self.signer = SendGridWebhookSigner.from_seed(new.seed)
            self.recipients.signer = self.signer
        self.config = new
        return new

    def reset(self, *, config: bool = False) -> None:
        self.state.reset()
        self.line.reset()
        self.recipients.clear()
        if config:
            self.config = self.initial_config
            self.recipients.clock = self.initial_clock

    def messages(self, channel: str | None = None, since: int = 0, limit: int | None = None) -> list[dict]:
        out = []
        for rec in self.state.records:
            if rec.seq <= since or (channel and rec.channel != channel):
                continue
            out.append(rec.to_json())
            if limit is not None and len(out) >= limit:
                break
        return out

    def stats(self) -> dict[str, Any]:
        return self.state.stats.to_json(self.recipients.pending)

    # ------------------------------------------------------------------ shared pipeline

    def _capture(self, request: web.Request, raw: bytes) -> None:
        limit = self.config.capture_requests
        if limit:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
            self.state.capture(limit, {"method": request.method, "path": request.path_qs, "headers": headers,
                                       "body": raw.decode("utf-8", "replace"), "time": time.time()})

    async def _gate(self, request: web.Request, channel: str, raw: bytes):
        """Latency, faults and rate limit. Returns None to go on, ``_Ghost`` to accept-then-drop, or a
        ``(status, kind)`` fault to answer instead."""
        cfg = self.config
        b = cfg.behaviour(channel)
        if b.latency_ms or b.latency_jitter_ms:
            delay = b.latency_ms
            if b.latency_jitter_ms:
                delay += seeded_rng(cfg.seed, "jitter", raw, time.monotonic_ns()).random() * b.latency_jitter_ms
            await asyncio.sleep(delay / 1000)
        if b.error_rate or b.timeout_rate or b.drop_rate or b.ghost_rate:
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            attempt = self.state.attempts[digest]
            self.state.attempts[digest] = attempt + 1
            rng = seeded_rng(cfg.seed, "fault", channel, digest, attempt)
            draw = rng.random()
            faults = self.state.stats.faults[channel]
            if draw < b.error_rate:
                faults["error"] += 1
                return ("error", 503 if rng.random() < 0.5 else 500)
            draw -= b.error_rate
            if draw < b.timeout_rate:
                faults["timeout"] += 1
                await self._hold(request)
                return ("timeout", 504)
            draw -= b.timeout_rate
            if draw < b.drop_rate:
                faults["drop"] += 1
                self._drop(request)
            draw -= b.drop_rate
            if draw < b.ghost_rate:
                faults["ghost"] += 1
                ghost: Any = _Ghost
            else:
                ghost = None
        else:
            ghost = None
        if b.rate_limit:
            bucket = self.state.buckets.get(channel)
            capacity = b.burst or max(1.0, b.rate_limit)
            if bucket is None or bucket.rate != b.rate_limit or bucket.capacity != capacity:
                bucket = self.state.buckets[channel] = TokenBucket(b.rate_limit, capacity)
            wait = bucket.take()
            if wait > 0:
                self.state.stats.throttled[channel] += 1
                return ("throttled", max(1, math.ceil(wait)))
        return ghost

    async def _hold(self, request: web.Request) -> None:
        """Keep the request open past the client's timeout (stop early once the client gave up)."""
        end = time.monotonic() + self.config.timeout_hold_s
        while time.monotonic() < end:
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.05)

    @staticmethod
    def _drop(request: web.Request):
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # aiohttp ends the request quietly; the client sees a reset

    def _reject(self, channel: str, reason: str) -> None:
        self.state.stats.rejected[channel][reason] += 1

    def _accept(self, rec: MessageRecord) -> None:
        self.state.record(rec)
        self.recipients.on_accepted(rec)

    # ------------------------------------------------------------------ SendGrid

    async def sendgrid_send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self._capture(request, raw)
        self.state.stats.requests["email"] += 1
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else ""
        if not key or (self.config.sendgrid_api_keys and key not in self.config.sendgrid_api_keys):
            self._reject("email", "unauthorized")
            return web.json_response(sendgrid_wire.sendgrid_unauthorized(), status=401)
        gate = await self._gate(request, "email", raw)
        if isinstance(gate, tuple):
            kind, value = gate
            if kind == "throttled":
                reset = int(time.time()) + value
                return web.json_response({"errors": [{"field": None, "message": "too many requests"}]}, status=429,
                                         headers={"Retry-After": str(value), "X-RateLimit-Limit": "600",
                                                  "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
            return web.json_response({"errors": [{"field": None, "message": "Internal Server Error" if value == 500
                                                  else "Service Unavailable", "help": None}]}, status=value)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._reject("email", "bad_json")
            return web.json_response({"errors": [sendgrid_wire.sendgrid_error("Bad Request", None, None)]}, status=400)
        errors = sendgrid_wire.validate_sendgrid_mail(body)
        if errors:
            bad_rcpt = any(".to." in str(e.get("field")) for e in errors)
            self._reject("email", "invalid_recipient" if bad_rcpt else "invalid_payload")
            return web.json_response({"errors": errors}, status=400)
        x_message_id = base64.urlsafe_b64encode(bytes.fromhex(stable_id(self.config.seed, "sg", self.state.seq + 1,
                                                                        length=32))).decode()[:22]
        account = hashlib.sha256(key.encode()).hexdigest()[:8]
        top_args = body.get("custom_args") or {}
        cats = body.get("categories") or []
        html = next((c["value"] for c in body.get("content") or [] if c.get("type") == "text/html"), None)
        link = sendgrid_wire.first_link(html)
        for pers in body["personalizations"]:
            args = {**top_args, **(pers.get("custom_args") or {})}
            for rcpt in pers["to"]:
                to = rcpt["email"]
                attrs = {**args, "channel": "email", "domain": to.rpartition("@")[2].lower(),
                         "categories": "\x1f".join(cats)}
                rec = MessageRecord(seq=self.state.next_seq(), channel="email", provider_id=x_message_id,
                                    message_id=args.get(MESSAGE_ID_ARG), idempotency_key=args.get(IDEMPOTENCY_KEY_ARG),
                                    to=to, accepted_at=time.time(), account=account, ghost=gate is _Ghost,
                                    attributes=attrs, extra={"custom_args": args, "categories": cats, "link": link})
                self._accept(rec)
        if gate is _Ghost:
            self._drop(request)
        return web.Response(status=202, headers={"X-Message-Id": x_message_id})

    # ------------------------------------------------------------------ Twilio

    async def twilio_create(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self._capture(request, raw)
        self.state.stats.requests["sms"] += 1
        account_sid = request.match_info["account_sid"]
        token = self._twilio_token(request, account_sid)
        if token is None:
            self._reject("sms", "unauthorized")
            return web.json_response(twilio_wire.twilio_unauthorized(), status=401)
        gate = await self._gate(request, "sms", raw)
        if isinstance(gate, tuple):
            kind, value = gate
            if kind == "throttled":
                return web.json_response(twilio_wire.twilio_error(429, 20429, "Too Many Requests"), status=429,
                                         headers={"Retry-After": str(value)})
            code = 20500 if value == 500 else 20503
            return web.json_response(twilio_wire.twilio_error(value, code, "Internal Server Error" if value == 500
                                                    else "Service Unavailable"), status=value)
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        to, from_, service = form.get("To", ""), form.get("From") or None, form.get("MessagingServiceSid") or None
        body = form.get("Body", "")

        def error(code: int, message: str, reason: str) -> web.Response:
            self._reject("sms", reason)
            return web.json_response(twilio_wire.twilio_error(400, code, message), status=400)

        if not to:
            return error(21604, "A 'To' phone number is required.", "invalid_payload")
        if not from_ and not service:
            return error(21603, "A 'From' phone number is required.", "invalid_payload")
        if not body and not form.get("MediaUrl") and not form.get("ContentSid"):
            return error(21602, "Message body is required.", "invalid_payload")
        if len(body) > 1600:
            return error(21617, "The concatenated message body exceeds the 1600 character limit.", "invalid_payload")
        kind = twilio_wire.classify_number(to)
        if kind == "invalid":
            return error(21211, f"Invalid 'To' Phone Number: {to[:4]}XXXX", "invalid_recipient")
        if kind == "landline":
            return error(21614, "'To' number is not a valid mobile number", "invalid_recipient")
        if to in self.state.opted_out or to in self.config.twilio_opted_out:
            return error(21610, "Attempt to send to unsubscribed recipient", "opted_out")
        callback = form.get("StatusCallback") or None
        query = parse_qs(urlsplit(callback).query) if callback else {}
        sid = "SM" + stable_id(self.config.seed, "sm", self.state.seq + 1)
        attrs = {k: v[0] for k, v in query.items()}
        attrs.update({"channel": "sms", "country": twilio_wire.number_region(to)})
        rec = MessageRecord(seq=self.state.next_seq(), channel="sms", provider_id=sid,
                            message_id=_first(query, CALLBACK_MESSAGE_ID_PARAM),
                            idempotency_key=_first(query, CALLBACK_IDEMPOTENCY_KEY_PARAM), to=to,
                            accepted_at=time.time(), account=account_sid, ghost=gate is _Ghost, attributes=attrs,
                            extra={"from": from_, "messaging_service_sid": service, "status_callback": callback,
                                   "auth_token": token, "body": body})
        self._accept(rec)
        if gate is _Ghost:
            self._drop(request)
        resource = twilio_wire.twilio_message_resource(sid=sid, account_sid=account_sid, to=to, from_=from_, body=body,
                                             messaging_service_sid=service)
        return web.json_response(resource, status=201)

    def _twilio_token(self, request: web.Request, account_sid: str) -> str | None:
        """The auth token of a request Twilio would authenticate for ``account_sid`` (Basic auth with the
        AccountSid or an API key ``SK...``), else None."""
        user, token = _basic_auth(request.headers.get("Authorization", ""))
        accounts = self.config.twilio_accounts
        if not user or not token or (user != account_sid and not user.startswith("SK")) or (
                accounts and accounts.get(account_sid) != token):
            return None
        return token

    async def twilio_list(self, request: web.Request) -> web.StreamResponse:
        """Twilio's Messages list: ``To``, ``From``, ``DateSent`` / ``DateSent<`` / ``DateSent>`` filters, newest
        first, ``PageSize`` (default 50, at most 1000) and ``PageToken`` paging via ``next_page_uri``.

        Lists every message the sandbox accepted (ghosts included: accepted, answer lost) and nothing it
        refused or faulted before acceptance. ``date_sent`` is the acceptance time: the sandbox hands a
        message on at once. Auditing calls, not sends: counted in ``stats.lookups``, never faulted.
        """
        self._capture(request, b"")
        account_sid = request.match_info["account_sid"]
        if self._twilio_token(request, account_sid) is None:
            return web.json_response(twilio_wire.twilio_unauthorized(), status=401)
        self.state.stats.lookups["sms"] += 1
        q = request.query
        filters = [(k, q[k]) for k in ("To", "From", "DateSent", "DateSent<", "DateSent>") if k in q]
        try:
            page_size = int(q.get("PageSize", 50))
            page = int(q.get("Page", 0))
            if not 1 <= page_size <= twilio_wire.TWILIO_LIST_MAX_PAGE_SIZE or page < 0:
                raise ValueError("PageSize must be 1 to 1000 and Page at least 0")
            low, high = -math.inf, math.inf
            for key, value in filters:
                if key.startswith("DateSent"):
                    first, last = twilio_wire.twilio_date_bounds(value)
                    low = max(low, first) if key in ("DateSent", "DateSent>") else low
                    high = min(high, last) if key in ("DateSent", "DateSent<") else high
            token = q.get("PageToken") or None
            direction, boundary = (token[:2], int(token[2:])) if token else ("PA", None)
            if direction not in ("PA", "PB"):
                raise ValueError("invalid PageToken")
        except ValueError as exc:
            return web.json_response(twilio_wire.twilio_error(400, 20001, f"Invalid list parameters: {exc}"),
                                     status=400)
        to, from_ = q.get("To"), q.get("From")
        pool = self.state.sms_by_to.get(to, []) if to else [r for r in self.state.records if r.channel == "sms"]
        matching = [r for r in pool if r.account == account_sid and (not from_ or r.extra.get("from") == from_)
                    and low <= r.accepted_at <= high]  # in acceptance (seq) order
        if boundary is None:
            chosen = matching[-page_size:]
        elif direction == "PA":  # older than the boundary
            chosen = [r for r in matching if r.seq < boundary][-page_size:]
        else:  # newer than the boundary
            chosen = [r for r in matching if r.seq > boundary][:page_size]
        older = bool(chosen) and any(r.seq < chosen[0].seq for r in matching)
        newer = bool(chosen) and any(r.seq > chosen[-1].seq for r in matching)
        messages = [twilio_wire.twilio_message_resource(sid=r.provider_id, account_sid=account_sid, to=r.to,
                                              from_=r.extra.get("from"), body=r.extra.get("body", ""),
                                              messaging_service_sid=r.extra.get("messaging_service_sid"),
                                              now=r.accepted_at, status="sent", date_sent=r.accepted_at)
                    for r in reversed(chosen)]
        return web.json_response(twilio_wire.twilio_list_page(
            account_sid=account_sid, filters=filters, messages=messages, page=page, page_size=page_size, token=token,
            next_token=f"PA{chosen[0].seq}" if older else None,
            previous_token=f"PB{chosen[-1].seq}" if newer else None))

    # ------------------------------------------------------------------ FCM

    async def fcm_token(self, request: web.Request) -> web.StreamResponse:
        form = dict(parse_qsl((await request.read()).decode("utf-8", "replace")))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not form.get("assertion"):
            return web.json_response({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"},
                                     status=400)
        email, err = fcm_wire.check_jwt_assertion(form["assertion"], token_url_path=TOKEN_PATH,
                                           public_keys=self.config.fcm_service_accounts,
                                           require_known=self.config.fcm_require_known_service_account)
        if err:
            return web.json_response({"error": "invalid_grant", "error_description": err}, status=400)
        access = "ya29.sandbox-" + secrets.token_urlsafe(24)
        self.fcm_access_tokens[access] = email or ""
        return web.json_response({"access_token": access, "expires_in": 3599, "token_type": "Bearer"})

    async def fcm_send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self._capture(request, raw)
        self.state.stats.requests["push"] += 1
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.fcm_access_tokens:
            self._reject("push", "unauthorized")
            return web.json_response(fcm_wire.fcm_unauthenticated(), status=401)
        gate = await self._gate(request, "push", raw)
        if isinstance(gate, tuple):
            kind, value = gate
            if kind == "throttled":
                return web.json_response(fcm_wire.fcm_quota_exceeded(), status=429, headers={"Retry-After": str(value)})
            body = (fcm_wire.fcm_error(500, "INTERNAL", "Internal error encountered.") if value == 500 else
                    fcm_wire.fcm_error(value, "UNAVAILABLE", "The service is currently unavailable."))
            return web.json_response(body, status=value)
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        msg, err = fcm_wire.validate_fcm_message(payload)
        if err:
            self._reject("push", "invalid_argument")
            return web.json_response(fcm_wire.fcm_error(400, "INVALID_ARGUMENT", err, "INVALID_ARGUMENT"), status=400)
        token = msg.get("token") or msg.get("fid") or ""
        if token and (token in self.state.unregistered or token in self.config.fcm_unregistered_tokens or
                      (self.config.fcm_stale_prefix and token.startswith(self.config.fcm_stale_prefix))):
            self._reject("push", "unregistered")
            return web.json_response(fcm_wire.fcm_unregistered(), status=404)
        project = request.match_info["project"]
        seq = self.state.seq + 1
        name = f"projects/{project}/messages/0:{int(stable_id(self.config.seed, 'fcm', seq, length=16), 16)}"
        if payload.get("validate_only"):
            return web.json_response({"name": name})
        data = msg.get("data") or {}
        attrs = {**data, "channel": "push"}
        rec = MessageRecord(seq=self.state.next_seq(), channel="push", provider_id=name,
                            message_id=data.get(MESSAGE_ID_ARG), idempotency_key=data.get(IDEMPOTENCY_KEY_ARG),
                            to=token or msg.get("topic") or msg.get("condition") or "", accepted_at=time.time(),
                            account=project, ghost=gate is _Ghost, attributes=attrs)
        self._accept(rec)
        if gate is _Ghost:
            self._drop(request)
        return web.json_response({"name": name})

    # ------------------------------------------------------------------ control API (HTTP)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def get_messages(self, request: web.Request) -> web.Response:
        q = request.query
        channel = q.get("channel")
        if channel and channel not in CHANNELS:
            return web.json_response({"error": f"unknown channel {channel!r}"}, status=400)
        try:
            since = int(q.get("since", 0))
            limit = int(q["limit"]) if "limit" in q else None
        except ValueError:
            return web.json_response({"error": "since and limit must be integers"}, status=400)
        items = self.messages(channel, since, limit)
        return web.json_response({"messages": items, "count": len(items),
                                  "last_seq": items[-1]["seq"] if items else since})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config.to_dict())

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            patch = await request.json()
            self.reconfigure(patch)
        except (ValueError, ConfigError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.config.to_dict())

    async def post_reset(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        self.reset(config=bool(isinstance(body, dict) and body.get("config")))
        return web.json_response({"ok": True})

    async def post_drain(self, request: web.Request) -> web.Response:
        timeout = float(request.query.get("timeout", 10))
        drained = await self.recipients.drain(timeout)
        return web.json_response({"drained": drained, "pending": self.recipients.pending})

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": list(self.state.captured)})

    async def get_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"sendgrid_webhook_public_key": self.signer.public_key_b64})


def _basic_auth(header: str) -> tuple[str, str]:
    if not header.startswith("Basic "):
        return "", ""
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return "", ""
    return user, password


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (roughly twice the request rate), else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def start_site(sandbox: SandboxApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(sandbox.build(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port  # type: ignore[union-attr]
    return runner, int(bound)


class SandboxServer:
    """A sandbox on its own event-loop thread, for tests and in-process tools.

    ::

        with SandboxServer(SandboxConfig(seed=7)) as sandbox:
            env = {"MEMBERCARE_SENDGRID_BASE_URL": sandbox.url, ...}
            ...
            assert sandbox.stats()["accepted"]["email"] == 1

    The helper methods run on the server's loop (thread-safe); the same data is served over HTTP at
    ``/sandbox/*`` for out-of-process users.
    """

    def __init__(self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 model: EngagementModel | None = None, clock: EventClock | None = None):
        self.app = SandboxApp(config, model=model, clock=clock)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_uri(self) -> str:
        return self.url + TOKEN_PATH

    def start(self) -> SandboxServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._runner, self.port = loop.run_until_complete(start_site(self.app, self.host, self.port))
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="membercare-sandbox", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result (``fn`` may return an awaitable)."""
        assert self._loop is not None

        async def wrapper():
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(60)

    def configure(self, **patch: Any) -> SandboxConfig:
        return self.call(lambda: self.app.reconfigure(patch))

    def reset(self, *, config: bool = False) -> None:
        self.call(lambda: self.app.reset(config=config))

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        return self.call(lambda: self.app.messages(channel))

    def stats(self) -> dict[str, Any]:
        return self.call(self.app.stats)

    def captured(self) -> list[dict[str, Any]]:
        return self.call(lambda: list(self.app.state.captured))

    def drain(self, timeout: float = 10.0) -> bool:
        return self.call(lambda: self.app.recipients.drain(timeout))

    def set_event_clock(self, clock: EventClock | None) -> None:
        """When the simulated recipients' events happen from now on (``None``: the wall clock at the moment
        an event is built). ``reset(config=True)`` restores the clock the server was constructed with.

        A test that writes data between two sends uses it to place the later events after that data
        (SendGrid stamps whole seconds) instead of waiting for the wall clock to move on.
        """
        self.call(lambda: setattr(self.app.recipients, "clock", clock))

    @property
    def sendgrid_public_key(self) -> str:
        return self.app.signer.public_key_b64


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve(config: SandboxConfig, host: str, port: int, *, on_ready: Callable[[SandboxApp, int], None]
                | None = None) -> None:
    """Run a sandbox until SIGINT or SIGTERM (or until cancelled), then shut it down cleanly (the CLI).

    On the main thread it installs its own handlers for both signals, whatever the process inherited:
    a non-interactive shell starts background jobs with SIGINT ignored (so Ctrl-C or ``kill -INT``
    would do nothing), and SIGTERM's default action would end the process without the cleanup.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        sandbox = SandboxApp(config)
        runner, bound = await start_site(sandbox, host, port)
        if on_ready:
            on_ready(sandbox, bound)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
