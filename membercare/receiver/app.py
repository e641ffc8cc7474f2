"""The webhook receiver: signed provider webhooks, app push tracking and the member link pages.

``create_app(config, engine)`` builds a FastAPI app from an explicit :class:`ReceiverConfig` and a
SQLAlchemy engine (no globals, so tests and the benchmark run several side by side)::

    POST /webhooks/sendgrid         SendGrid Event Webhook (ECDSA P-256 over timestamp + raw body)
    POST /webhooks/twilio/status    Twilio status callbacks (X-Twilio-Signature)
    POST /webhooks/twilio/inbound   Twilio inbound SMS: STOP / START / HELP (answers TwiML)
    POST /track/push                the shop's app: push received / opened / dismissed (HMAC-SHA256)
    GET  /u/{token}                 unsubscribe + preference page, in the member's language
    GET  /u/{token}/preferences     the same page (the link rendering puts in messages)
    POST /u/{token}                 RFC 8058 one-click (List-Unsubscribe=One-Click) or the page's forms
    GET  /healthz                   liveness + database check

Guarantees:

* Every request body is bounded and must be UTF-8, checked once for all endpoints as it streams in
  (:class:`BodyLimit`): over its endpoint's limit it is 413 before more than the limit is read (at once
  when ``Content-Length`` says so), not UTF-8 it is 400. These need no secret and come first.
* Authentication comes next: a missing signature is 401, a wrong, garbled or stale one
  is 403, and neither touches the database. An endpoint without a configured secret answers 503.
* The signature is checked over the exact bytes received (never re-serialised JSON), and the Twilio
  signature over ``MEMBERCARE_PUBLIC_URL`` + path + query as the provider called it.
* A body that is not the provider's shape is 400 (after authentication), as is JSON nested deeper than
  ``MAX_JSON_DEPTH`` (refused before it is parsed). Inside a valid batch, an event whose ids or address
  cannot be used (a NUL or another control character, absurd length) is stored without them and listed
  under ``"cleaned"`` in the answer (SendGrid), or refused alone and listed under ``"rejected"`` (app push
  reports); the valid events beside it are stored and take effect, and the batch is answered 2xx.
* Accepted events are committed, with their effects, before the 2xx answer: a provider that sees a
  2xx may forget the event, anything else makes it retry. A retried delivery is stored once
  (``engagement_events`` unique key), so retries are harmless.
* One request is one transaction and one bulk insert (SendGrid posts ~1000 events at a time), except
  Twilio status callbacks (one event per request): those of concurrent requests share a transaction
  (:mod:`membercare.receiver.group_commit`), still committed before each answer. Database work runs in
  the threadpool; SQLite writers are serialised in-process (see ``store.writer_lock``).

Nothing here logs an address, a token (link tokens are in the path: uvicorn's access log is off in
``membercare serve`` for that reason) or a secret.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from urllib.parse import parse_qsl

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from channels.fcm_webhooks import SIGNATURE_HEADER as PUSH_SIGNATURE_HEADER
from channels.fcm_webhooks import verify_push_tracking
from channels.push_events import RejectedReport, parse_push_reports
from channels.sendgrid_events import parse_sendgrid_body
from channels.sendgrid_webhooks import SIGNATURE_HEADER as SG_SIGNATURE_HEADER
from channels.sendgrid_webhooks import TIMESTAMP_HEADER as SG_TIMESTAMP_HEADER
from channels.sendgrid_webhooks import verify_sendgrid_signature
from channels.twilio_events import parse_inbound, parse_status_callback, twilio_handles_reply
from channels.twilio_webhooks import SIGNATURE_HEADER as TWILIO_SIGNATURE_HEADER
from channels.twilio_webhooks import verify_twilio_signature
from membercare.delivery.contract import redact
from membercare.engagement.events import EngagementEvent, InboundCommand, MalformedPayload
from membercare.engagement.store import IngestResult, ingest_events, take_write_lock, writer_lock
from membercare.errors import InputError
from membercare.links import LinkScope, verify_member_token
from membercare.models import Channel, ConsentSource, Member
from membercare.receiver import pages
from membercare.receiver.config import ReceiverConfig
from membercare.receiver.group_commit import GroupCommit
from membercare.receiver.preferences import desired_from_form, load_member, set_consents, unsubscribe
from membercare.receiver.triggers import MAX_BODY as TRIGGER_MAX_BODY
from membercare.receiver.triggers import TriggerConfig, TriggerStarter, build_trigger_router
from membercare.timeutil import utcnow

log = logging.getLogger("membercare.receiver")

ONE_CLICK = ("List-Unsubscribe", "One-Click")


class _Reject(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


# Body limits per endpoint (SendGrid's comes from the configuration). Twilio form posts are a few KB, an app
# flushing its queue sends at most 1000 small reports, the member pages post a short form.
TWILIO_MAX_BODY = 1024 * 1024
PUSH_MAX_BODY = 4 * 1024 * 1024
PAGE_MAX_BODY = 64 * 1024
DEFAULT_MAX_BODY = 64 * 1024  # any other path (/healthz, unknown ones)
MAX_FORM_FIELDS = 1000  # Twilio posts a few dozen (MediaUrl0..9 included)
MAX_MEMBER_ID = 2**63 - 1  # members.id is a signed 64-bit integer; link tokens can carry up to 2**64 - 1


class _BodyRefused(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


class BodyLimit:
    """ASGI middleware: the one place where request bodies are bounded and checked to be UTF-8.

    ``limits`` maps path prefixes to the most bytes a body may have there (the longest matching prefix
    wins; other paths get ``default``). For every request:

    * a ``Content-Length`` over the limit is answered 413 at once, before any of the body is read (a
      client that sent ``Expect: 100-continue`` never sends it);
    * without one (chunked transfer), the body is counted as the application reads it, and the request is
      answered 413 at the first chunk past the limit: nothing after it is read, so a slow or endless
      upload costs at most the limit in memory;
    * the body is decoded incrementally as it arrives, and answered 400 at the first byte that is not
      UTF-8 (every endpoint takes JSON or a form, both UTF-8 text).

    Handlers then simply ``await request.body()``. These checks need no secret, so they come before
    authentication and reveal nothing about it.
    """

    def __init__(self, app, *, limits: Sequence[tuple[str, int]], default: int):
        self.app = app
        self.limits = sorted(limits, key=lambda item: len(item[0]), reverse=True)
        self.default = default

    def limit_for(self, path: str) -> tuple[str, int]:
        """``(matching prefix, limit)``; the prefix names the endpoint in logs without a link token."""
        for prefix, limit in self.limits:
            if path.startswith(prefix):
                return prefix, limit
        return "other paths", self.default

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, limit = self.limit_for(scope["path"])
        too_large = f"body too large: at most {limit} bytes accepted here"
        declared = [value for name, value in scope["headers"] if name == b"content-length"]
        if declared:
            # uvicorn (h11, httptools) already refuses a malformed or conflicting Content-Length; other servers may not.
            if not declared[0].isdigit():
                await _refuse(send, 400, "invalid Content-Length")
                return
            if int(declared[0]) > limit:
                log.warning("refused a body of %s bytes to %s (limit %d)", declared[0].decode(), endpoint, limit)
                await _refuse(send, 413, too_large)
                return
        received = 0
        utf8 = codecs.getincrementaldecoder("utf-8")()

        async def checked_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise _BodyRefused(413, too_large)
                try:
                    utf8.decode(chunk, final=not message.get("more_body", False))
                except UnicodeDecodeError:
                    raise _BodyRefused(400, "body is not UTF-8") from None
            return message

        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, checked_receive, watched_send)
        except _BodyRefused as exc:
            if started:  # a handler that answered before reading its body: nothing left to say
                return
            if exc.status == 413:
                log.warning("refused a body over %d bytes to %s", limit, endpoint)
            await _refuse(send, exc.status, exc.detail)


async def _refuse(send, status: int, detail: str) -> None:
    body = JSONResponse({"error": detail}).body
    # Closing tells the client (and any proxy) that the rest of an unread body will not be read.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# The names of the store's cleaned fields in SendGrid's payload (see ``store._usable``).
_SENDGRID_FIELDS = {"recipient": "email", "message_id": "membercare_message_id",
                    "provider_message_id": "sg_message_id", "dedupe_key": "sg_event_id"}


def _accepted(result: IngestResult, *, fields: dict[str, str] | None = None,
              rejected: list[RejectedReport] | None = None, positions: Sequence[int] | None = None) -> JSONResponse:
    """The 2xx answer: counts, plus the events stored without an unusable key (``cleaned``) and the ones
    refused on their own (``rejected``), by their index in the request. ``positions`` maps the stored
    events back to request indexes when some were rejected."""
    body: dict = {"received": result.received + len(rejected or ()), "stored": result.stored,
                  "duplicates": result.duplicates}
    if result.cleaned:
        fields = fields or {}
        body["cleaned"] = [{"index": positions[i] if positions is not None else i,
                            "fields": [fields.get(name, name) for name in names]}
                           for i, names in sorted(result.cleaned.items())]
    if rejected is not None:
        body["rejected"] = [{"index": r.index, "error": r.error} for r in rejected]
    return JSONResponse(body)


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        # Blank values are kept: Twilio signs them.
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS))
    except UnicodeDecodeError:
        raise _Reject(400, "form body is not UTF-8") from None
    except ValueError:
        raise _Reject(400, f"form body has more than {MAX_FORM_FIELDS} fields") from None


def create_app(config: ReceiverConfig, engine: Engine, trigger_starter: TriggerStarter | None = None) -> FastAPI:
    """The receiver for ``config`` writing to ``engine`` (already migrated); ``trigger_starter`` runs
    ``POST /triggers/{event}`` (without one that endpoint answers 503)."""
    app = FastAPI(title="membercare receiver", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.engine = engine
    app.state.group_commit = grouped = GroupCommit(engine)
    app.add_middleware(
        BodyLimit, default=DEFAULT_MAX_BODY,
        limits=[("/webhooks/sendgrid", config.max_body_bytes), ("/webhooks/twilio/", TWILIO_MAX_BODY),
                ("/track/push", PUSH_MAX_BODY), ("/triggers/", TRIGGER_MAX_BODY), ("/u/", PAGE_MAX_BODY)],
    )

    @app.exception_handler(_Reject)
    async def _reject(_request: Request, exc: _Reject) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status)

    async def store(events: list[EngagementEvent], what: str) -> IngestResult:
        started = time.perf_counter()
        result = await run_in_threadpool(ingest_events, engine, events)
        log.info("%s: %d events, %d new, %d duplicates, %d suppressions, %d consent changes, %d devices "
                 "invalidated in %.1f ms", what, result.received, result.stored, result.duplicates, result.suppressed,
                 result.consent_changes, result.devices_invalidated, (time.perf_counter() - started) * 1000)
        if result.cleaned:
            # Field names only: the values are addresses and ids.
            fields = sorted({name for names in result.cleaned.values() for name in names})
            log.warning("%s: %d event(s) stored without an unusable key (control characters or too long): %s",
                        what, len(result.cleaned), ", ".join(fields))
        return result

    # -- SendGrid -----------------------------------------------------------------------------------------------------

    @app.post("/webhooks/sendgrid")
    async def sendgrid_webhook(request: Request) -> Response:
        if not config.sendgrid_public_key:
            raise _Reject(503, "SendGrid webhook verification key is not configured")
        signature = request.headers.get(SG_SIGNATURE_HEADER)
        timestamp = request.headers.get(SG_TIMESTAMP_HEADER)
        if not signature or not timestamp:
            raise _Reject(401, "missing SendGrid signature headers")
        body = await request.body()
        if not verify_sendgrid_signature(config.sendgrid_public_key, body, signature, timestamp,
                                         tolerance_s=config.signature_tolerance_s):
            log.warning("rejected SendGrid webhook: bad or stale signature (%d bytes)", len(body))
            raise _Reject(403, "invalid or expired signature")
        try:
            events = parse_sendgrid_body(body)
        except MalformedPayload as exc:
            raise _Reject(400, str(exc)) from None
        return _accepted(await store(events, "sendgrid"), fields=_SENDGRID_FIELDS)

    # -- Twilio -------------------------------------------------------------------------------------------------------

    async def twilio_params(request: Request) -> dict[str, str]:
        if not config.twilio_auth_token:
            raise _Reject(503, "Twilio auth token is not configured")
        signature = request.headers.get(TWILIO_SIGNATURE_HEADER)
        if not signature:
            raise _Reject(401, "missing X-Twilio-Signature")
        params = _form(await request.body())
        # Twilio signs the URL it called: our public base URL, the path and the query exactly as sent.
        query = request.url.query
        url = f"{config.public_url}{request.url.path}" + (f"?{query}" if query else "")
        if not verify_twilio_signature(config.twilio_auth_token, url, params, signature):
            log.warning("rejected Twilio webhook to %s: bad signature", request.url.path)
            raise _Reject(403, "invalid signature")
        return params

    @app.post("/webhooks/twilio/status")
    async def twilio_status(request: Request) -> Response:
        params = await twilio_params(request)
        try:
            event = parse_status_callback(params, dict(request.query_params))
        except MalformedPayload as exc:
            raise _Reject(400, str(exc)) from None
        await grouped.store([event])
        return Response(status_code=204)

    @app.post("/webhooks/twilio/inbound")
    async def twilio_inbound(request: Request) -> Response:
        params = await twilio_params(request)
        try:
            event = parse_inbound(params)
        except MalformedPayload as exc:
            raise _Reject(400, str(exc)) from None
        result = await store([event], "twilio inbound")
        reply = None
        # A sender number that could not be used changed nothing: no confirmation is sent to it.
        if event.command is not None and "recipient" not in result.cleaned.get(0, ()):
            member_id = result.member_ids[0] if result.member_ids else None
            locale = await run_in_threadpool(_member_locale, engine, member_id)
            reply = _keyword_reply(config, event, locale or config.shop_locale)
        return Response(content=_twiml(reply), media_type="application/xml")

    # -- Push tracking ------------------------------------------------------------------------------------------------

    @app.post("/track/push")
    async def track_push(request: Request) -> Response:
        if not config.push_tracking_secret:
            raise _Reject(503, "push tracking secret is not configured")
        signature = request.headers.get(PUSH_SIGNATURE_HEADER)
        if not signature:
            raise _Reject(401, f"missing {PUSH_SIGNATURE_HEADER}")
        body = await request.body()
        if not verify_push_tracking(config.push_tracking_secret, body, signature):
            raise _Reject(403, "invalid signature")
        try:
            parsed, rejected = parse_push_reports(body)
        except MalformedPayload as exc:
            raise _Reject(400, str(exc)) from None
        # The report's time is inside the signed body; bound it so that a captured request cannot be
        # replayed forever (within the window the dedupe key makes a replay a no-op). Each report is
        # judged alone: an app flushing its offline queue keeps its fresh reports beside a stale one.
        now = utcnow()
        oldest = now - timedelta(seconds=config.push_max_age_s)
        newest = now + timedelta(seconds=config.signature_tolerance_s)
        fresh: list[tuple[int, EngagementEvent]] = []
        stale: list[RejectedReport] = []
        for i, e in parsed:
            if oldest <= e.occurred_at <= newest:
                fresh.append((i, e))
            else:
                stale.append(RejectedReport(i, "occurred_at outside the accepted window"))
        if not fresh:
            # Nothing to store: a replayed capture (403), or nothing valid at all (400).
            if stale:
                raise _Reject(403, "report timestamp outside the accepted window")
            raise _Reject(400, rejected[0].error if len(rejected) == 1 else
                          f"no valid report ({len(rejected)} rejected; the first: {rejected[0].error})")
        rejected = sorted(rejected + stale, key=lambda r: r.index)
        if rejected:
            log.warning("push: %d of %d reports rejected", len(rejected), len(fresh) + len(rejected))
        result = await store([e for _, e in fresh], "push")
        return _accepted(result, rejected=rejected, positions=[i for i, _ in fresh])

    # -- Member links -------------------------------------------------------------------------------------------------

    def claims(token: str):
        if not config.secret_key:
            raise _Reject(503, "MEMBERCARE_SECRET_KEY is not configured")
        try:
            return verify_member_token(token, config.link_secrets)
        except InputError:
            return None

    def page(status: int, *, locale: str | None, token: str, error_key: str | None = None, member=None,
             scope: str = "all", notice: str | None = None) -> HTMLResponse:
        model = pages.PageModel(
            locale=locale, shop=config.shop_name_for(pages.language(locale)), action=f"{config.public_url}/u/{token}",
            name=member.name if member else "",
            account=redact(member.email) if member and member.email else (redact(member.phone) if member else ""),
            scope=scope, state=member.consents if member else None, notice=notice, error_key=error_key,
        )
        headers = {"Cache-Control": "no-store", "X-Robots-Tag": "noindex", "Referrer-Policy": "no-referrer"}
        return HTMLResponse(pages.render_page(model), status_code=status, headers=headers)

    @app.get("/u/{token}", response_class=HTMLResponse)
    @app.get("/u/{token}/preferences", response_class=HTMLResponse)
    async def member_page(token: str) -> Response:
        c = claims(token)
        if c is None:
            return page(403, locale=config.shop_locale, token=token, error_key="invalid")
        member = await run_in_threadpool(_load, engine, c.member_id)
        if member is None:
            return page(404, locale=config.shop_locale, token=token, error_key="not_found")
        return page(200, locale=member.locale, token=token, member=member, scope=c.scope.value)

    @app.post("/u/{token}")
    @app.post("/u/{token}/preferences")
    async def member_post(token: str, request: Request) -> Response:
        c = claims(token)
        if c is None:
            return page(403, locale=config.shop_locale, token=token, error_key="invalid")
        form = _form(await request.body())
        scope = c.scope.value
        channels = [ch.value for ch in Channel] if c.scope is LinkScope.ALL else [scope]
        if form.get(ONE_CLICK[0]) == ONE_CLICK[1]:
            # RFC 8058: a one-click POST from the mail client unsubscribes at once. It comes from an email's
            # List-Unsubscribe header, so "all" scope means marketing email.
            targets = [Channel.EMAIL.value] if c.scope is LinkScope.ALL else [scope]
            member = await run_in_threadpool(_change, engine, c.member_id, "unsubscribe", targets,
                                              ConsentSource.LIST_UNSUBSCRIBE, None)
            if member is None:
                return PlainTextResponse("unknown member", status_code=404)
            return PlainTextResponse("unsubscribed", status_code=200)
        action = form.get("action")
        if action == "unsubscribe":
            member = await run_in_threadpool(_change, engine, c.member_id, "unsubscribe", channels,
                                              ConsentSource.UNSUBSCRIBE_LINK, None)
            notice_key = "unsubscribed"
        elif action == "save":
            member = await run_in_threadpool(_change, engine, c.member_id, "save", channels,
                                              ConsentSource.PREFERENCE_CENTER, desired_from_form(form))
            notice_key = "saved"
        else:
            raise _Reject(400, "unknown form action")
        if member is None:
            return page(404, locale=config.shop_locale, token=token, error_key="not_found")
        return page(200, locale=member.locale, token=token, member=member, scope=scope,
                    notice=pages.notice_text(notice_key, member.locale, scope))

    # -- Health -------------------------------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:
            log.error("health check: database unavailable: %s", type(exc).__name__)
            return JSONResponse({"status": "unavailable", "database": "error"}, status_code=503)
        return JSONResponse({"status": "ok"})

    # Event-triggered messages (order delivered, bad review, ...): POST /triggers/{event}.
    app.include_router(build_trigger_router(engine, TriggerConfig(config.trigger_secret), starter=trigger_starter))
    return app


# ---------------------------------------------------------------------------------------------------------------------
# Threadpool helpers (sync database work)


def _load(engine: Engine, member_id: int):
    if not 0 < member_id <= MAX_MEMBER_ID:  # a signed token can carry any 64-bit id; no member has this one
        return None
    with engine.connect() as conn:
        return load_member(conn, member_id)


def _change(engine: Engine, member_id: int, what: str, channels: list[str], source: ConsentSource, desired):
    """Apply an unsubscribe or a preference form in one transaction; returns the member as it is now."""
    if not 0 < member_id <= MAX_MEMBER_ID:
        return None
    now = utcnow()
    with writer_lock(engine):
        with engine.begin() as conn:
            # Read-then-write on SQLite must be a writer from the start (see take_write_lock).
            take_write_lock(conn)
            member = load_member(conn, member_id)
            if member is None:
                return None
            if what == "unsubscribe":
                unsubscribe(conn, member, channels, source=source, occurred_at=now)
            else:
                wanted = {k: v for k, v in desired.items() if k[0] in channels}
                set_consents(conn, member, wanted, source=source, occurred_at=now)
            return load_member(conn, member_id)


def _member_locale(engine: Engine, member_id: int | None) -> str | None:
    if member_id is None:
        return None
    m = Member.__table__
    with engine.connect() as conn:
        return conn.execute(sa.select(m.c.locale).where(m.c.id == member_id)).scalar()


def _keyword_reply(config: ReceiverConfig, event: EngagementEvent, locale: str) -> str | None:
    """Our SMS answer to a keyword, or ``None`` when Twilio's own opt-out handling already answered."""
    body = str(event.raw.get("Body", ""))
    shop = config.shop_name_for(pages.language(locale, pages.SMS_TEXT))
    if event.command is InboundCommand.HELP:
        # Twilio answers HELP itself only with its generic text; carriers expect the sender's own help.
        return pages.sms_reply("help", locale, shop=shop, support=config.support_contact)
    if twilio_handles_reply(body):
        return None
    kind = "stopped" if event.command is InboundCommand.STOP else "started"
    return pages.sms_reply(kind, locale, shop=shop, support=config.support_contact)


def _twiml(reply: str | None) -> str:
    from twilio.twiml.messaging_response import MessagingResponse

    response = MessagingResponse()
    if reply:
        response.message(reply)
    return str(response)
