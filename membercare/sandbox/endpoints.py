"""The three providers' HTTP endpoints in the sandbox: SendGrid Mail Send, Twilio Messages (create and list),
FCM v1 send and the OAuth token endpoint its service accounts use.

Each provider's wire format (request validation, answer and error bodies) lives in its folder
(``channels/<provider>/sandbox.py``); these endpoints run the shared pipeline around it
(:class:`~membercare.sandbox.app.SandboxApp`): credentials check -> latency, faults and rate limit
(:func:`~membercare.sandbox.pipeline.gate`) -> payload validation (the provider's own 4xx) -> accept (record,
answer, schedule the simulated recipient). Only accepted messages are recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, parse_qsl, urlsplit

from aiohttp import web

from channels.base import (
    CALLBACK_IDEMPOTENCY_KEY_PARAM,
    CALLBACK_MESSAGE_ID_PARAM,
    IDEMPOTENCY_KEY_ARG,
    MESSAGE_ID_ARG,
)
from channels.fcm import sandbox as fcm_wire
from channels.sendgrid import sandbox as sendgrid_wire
from channels.twilio import sandbox as twilio_wire
from membercare.sandbox.config import SandboxConfig
from membercare.sandbox.pipeline import GHOST, Fault, drop
from membercare.sandbox.state import MessageRecord, SandboxState, stable_id

if TYPE_CHECKING:
    from membercare.sandbox.app import SandboxApp

TOKEN_PATH = "/token"


class _Endpoints:
    """One provider's endpoints over a sandbox; ``config`` is read per request (``/sandbox/config`` changes it)."""

    def __init__(self, app: SandboxApp):
        self.app = app

    @property
    def config(self) -> SandboxConfig:
        return self.app.config

    @property
    def state(self) -> SandboxState:
        return self.app.state


class SendGridEndpoints(_Endpoints):
    """SendGrid's v3 Mail Send (``POST /v3/mail/send``): one record per recipient of each personalization."""

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v3/mail/send", self.sendgrid_send)]

    async def sendgrid_send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.app.capture(request, raw)
        self.state.stats.requests["email"] += 1
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else ""
        if not key or (self.config.sendgrid_api_keys and key not in self.config.sendgrid_api_keys):
            self.app.reject("email", "unauthorized")
            return web.json_response(sendgrid_wire.sendgrid_unauthorized(), status=401)
        gate = await self.app.gate(request, "email", raw)
        if isinstance(gate, Fault):
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
            self.app.reject("email", "bad_json")
            return web.json_response({"errors": [sendgrid_wire.sendgrid_error("Bad Request", None, None)]}, status=400)
        errors = sendgrid_wire.validate_sendgrid_mail(body)
        if errors or not isinstance(body, dict):  # (a body that is not an object has errors)
            bad_rcpt = any(".to." in str(e.get("field")) for e in errors)
            self.app.reject("email", "invalid_recipient" if bad_rcpt else "invalid_payload")
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
                                    to=to, accepted_at=time.time(), account=account, ghost=gate is GHOST,
                                    attributes=attrs, extra={"custom_args": args, "categories": cats, "link": link})
                self.app.accept(rec)
        if gate is GHOST:
            drop(request)
        return web.Response(status=202, headers={"X-Message-Id": x_message_id})


class TwilioEndpoints(_Endpoints):
    """Twilio's Messages resource: create (``POST``) and list (``GET``), Basic auth per account."""

    def routes(self) -> list[web.RouteDef]:
        path = "/2010-04-01/Accounts/{account_sid}/Messages.json"
        return [web.post(path, self.twilio_create), web.get(path, self.twilio_list)]


    async def twilio_create(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.app.capture(request, raw)
        self.state.stats.requests["sms"] += 1
        account_sid = request.match_info["account_sid"]
        token = self._twilio_token(request, account_sid)
        if token is None:
            self.app.reject("sms", "unauthorized")
            return web.json_response(twilio_wire.twilio_unauthorized(), status=401)
        gate = await self.app.gate(request, "sms", raw)
        if isinstance(gate, Fault):
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
            self.app.reject("sms", reason)
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
                            accepted_at=time.time(), account=account_sid, ghost=gate is GHOST, attributes=attrs,
                            extra={"from": from_, "messaging_service_sid": service, "status_callback": callback,
                                   "auth_token": token, "body": body})
        self.app.accept(rec)
        if gate is GHOST:
            drop(request)
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
        self.app.capture(request, b"")
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


class FcmEndpoints(_Endpoints):
    """FCM's v1 send (``POST /v1/projects/{project}/messages:send``) and the OAuth token endpoint (``/token``)
    that exchanges a service account's signed JWT for an access token."""

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/projects/{project}/messages:send", self.fcm_send), web.post(TOKEN_PATH, self.fcm_token)]


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
        self.app.fcm_access_tokens[access] = email or ""
        return web.json_response({"access_token": access, "expires_in": 3599, "token_type": "Bearer"})

    async def fcm_send(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.app.capture(request, raw)
        self.state.stats.requests["push"] += 1
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.app.fcm_access_tokens:
            self.app.reject("push", "unauthorized")
            return web.json_response(fcm_wire.fcm_unauthenticated(), status=401)
        gate = await self.app.gate(request, "push", raw)
        if isinstance(gate, Fault):
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
        if err or msg is None or not isinstance(payload, dict):  # (valid means a message in an object)
            self.app.reject("push", "invalid_argument")
            error = fcm_wire.fcm_error(400, "INVALID_ARGUMENT", err or "Request contains an invalid argument.",
                                       "INVALID_ARGUMENT")
            return web.json_response(error, status=400)
        token = msg.get("token") or msg.get("fid") or ""
        if token and (token in self.state.unregistered or token in self.config.fcm_unregistered_tokens or
                      (self.config.fcm_stale_prefix and token.startswith(self.config.fcm_stale_prefix))):
            self.app.reject("push", "unregistered")
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
                            account=project, ghost=gate is GHOST, attributes=attrs)
        self.app.accept(rec)
        if gate is GHOST:
            drop(request)
        return web.json_response({"name": name})


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

