"""The webhook receiver: signed provider webhooks, app push tracking and the member link pages.

``create_app(config, engine)`` builds a FastAPI app from an explicit :class:`ReceiverConfig` and a
SQLAlchemy engine (no globals, so tests and the benchmark run several side by side)::

    POST /webhooks/sendgrid         SendGrid Event Webhook (ECDSA P-256 over timestamp + raw body)
    POST /webhooks/twilio/status    Twilio status callbacks (X-Twilio-Signature)
    POST /webhooks/twilio/inbound   Twilio inbound SMS: STOP / START / HELP (answers TwiML)
    POST /track/push                the shop's app: push received / opened / dismissed (HMAC-SHA256)
    ...                             the webhooks of any other provider in ``channels.registry``
    GET  /u/{token}                 unsubscribe + preference page, in the member's language
    GET  /u/{token}/preferences     the same page (the link rendering puts in messages)
    POST /u/{token}                 RFC 8058 one-click (List-Unsubscribe=One-Click) or the page's forms
    GET  /r/{token}                 tracked short link: the click recorded, redirected to the original URL
    POST /line/link                 LINE account link: the shop's backend (signed) gets LINE's dialog URL
    GET  /u/{token}/line            the same from our signed member link (303 to LINE's dialog)
    GET  /healthz                   liveness + database check

The provider webhooks are not written out here: each registered provider (``channels.registry``) declares
its endpoints (:class:`channels.base.Webhook`: path, body limit, how to verify and parse), and
:func:`create_app` mounts them all behind one handler, so every provider gets the guarantees below alike.

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
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from channels.base import Webhook, WebhookAnswer, WebhookRejected, WebhookRequest, form_params
from channels.registry import PROVIDERS
from membercare.delivery.contract import redact
from membercare.engagement.events import EngagementEvent
from membercare.engagement.store import IngestResult, ingest_events, take_write_lock, writer_lock
from membercare.errors import InputError
from membercare.links import LinkScope, verify_member_token
from membercare.models import Channel, ConsentSource, Member
from membercare.receiver import pages
from membercare.receiver.clicks import mount_click_redirects
from membercare.receiver.config import ReceiverConfig
from membercare.receiver.events import MAX_BODY as EVENTS_MAX_BODY
from membercare.receiver.events import build_events_router
from membercare.receiver.group_commit import GroupCommit
from membercare.receiver.line_link import MAX_BODY as LINE_LINK_MAX_BODY
from membercare.receiver.line_link import LineLinker, line_linker, mount_line_link
from membercare.receiver.preferences import desired_from_form, load_member, set_consents, unsubscribe
from membercare.receiver.previews import mount_previews
from membercare.receiver.triggers import MAX_BODY as TRIGGER_MAX_BODY
from membercare.receiver.triggers import TriggerConfig, TriggerStarter, build_trigger_router
from membercare.timeutil import utcnow

log = logging.getLogger("membercare.receiver")

ONE_CLICK = ("List-Unsubscribe", "One-Click")


class _Reject(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail


# Body limits of our own endpoints (each provider webhook declares its own; see channels.base.Webhook): the
# member pages post a short form.
PAGE_MAX_BODY = 64 * 1024
DEFAULT_MAX_BODY = 64 * 1024  # any other path (/healthz, unknown ones)
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


def _form(body: bytes) -> dict[str, str]:
    try:
        return form_params(body)
    except WebhookRejected as exc:
        raise _Reject(exc.status, exc.detail) from None


def create_app(config: ReceiverConfig, engine: Engine, trigger_starter: TriggerStarter | None = None,
               clock: Callable[[], datetime] = utcnow) -> FastAPI:
    """The receiver for ``config`` writing to ``engine`` (already migrated); ``trigger_starter`` runs
    ``POST /triggers/{event}`` (without one that endpoint answers 503); ``clock`` dates LINE link nonces."""
    app = FastAPI(title="membercare receiver", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.engine = engine
    app.state.group_commit = grouped = GroupCommit(engine)
    webhooks = [(provider.name, webhook) for provider in PROVIDERS.values() for webhook in provider.webhooks()]
    app.add_middleware(
        BodyLimit, default=DEFAULT_MAX_BODY,
        limits=[*webhook_body_limits([w for _, w in webhooks], config.max_body_bytes),
                ("/triggers/", TRIGGER_MAX_BODY), ("/events", EVENTS_MAX_BODY), ("/u/", PAGE_MAX_BODY),
                ("/line/", LINE_LINK_MAX_BODY)],
    )

    @app.exception_handler(_Reject)
    async def _reject(_request: Request, exc: _Reject) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status)

    @app.exception_handler(WebhookRejected)
    async def _webhook_rejected(_request: Request, exc: WebhookRejected) -> Response:
        if exc.log_message:
            log.warning("%s", exc.log_message)
        return JSONResponse({"error": exc.detail}, status_code=exc.status)

    # -- Provider webhooks: every registered provider's endpoints, one handler shape ---------------------------------

    linker = line_linker(config, engine, clock)
    app.state.line_linker = linker
    context = _Context(config, engine, {"line": linker})
    for provider_name, webhook in webhooks:
        app.add_api_route(webhook.path, _webhook_handler(provider_name, webhook, config, engine, grouped, context),
                          methods=[webhook.method], name=f"{provider_name}: {webhook.label}")

    _mount_member_pages(app, config, engine)
    mount_line_link(app, config, engine, linker)  # POST /line/link, GET /u/{token}/line
    mount_click_redirects(app, config, engine)  # GET /r/{token}: tracked short links
    mount_previews(app, config.link_secrets)  # GET /previews/{token}: a run's preview behind a signed link

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
    # Member events (cart updates, orders, reviews, custom): POST /events, feeding the journeys.
    app.include_router(build_events_router(engine, config.trigger_secret))
    return app


def _mount_member_pages(app: FastAPI, config: ReceiverConfig, engine: Engine) -> None:
    """``/u/{token}``: the unsubscribe and preference page, its forms and RFC 8058 one-click."""

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
            line_linked=member.line_linked if member else None,
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


async def _store(engine: Engine, events: list[EngagementEvent], what: str) -> IngestResult:
    """One request's events in one transaction and one bulk insert, logged without their values."""
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


def webhook_body_limits(webhooks: Sequence[Webhook], batch_limit: int) -> list[tuple[str, int]]:
    """``(path prefix, most bytes)`` for :class:`BodyLimit`, from the webhooks' declarations; a webhook
    without its own limit gets ``batch_limit`` (the configured ``max_body_bytes``)."""
    limits: dict[str, int] = {}
    for webhook in webhooks:
        limits[webhook.body_limit_prefix or webhook.path] = webhook.body_limit or batch_limit
    return list(limits.items())


def _webhook_handler(provider: str, webhook: Webhook, config: ReceiverConfig, engine: Engine, grouped: GroupCommit,
                     context: _Context):
    """The one request handler of every provider webhook (the order is :class:`channels.base.Webhook`'s)."""

    async def handle(request: Request) -> Response:
        secret = config.webhook_secret(provider)
        if not secret:
            raise WebhookRejected(503, webhook.secret_missing)
        webhook.check_headers(request.headers)
        body = await request.body()
        incoming = WebhookRequest(path=request.url.path, query=request.url.query,
                                  query_params=request.query_params, headers=request.headers, body=body,
                                  secret=secret, public_url=config.public_url, tolerance_s=config.signature_tolerance_s,
                                  max_age_s=config.push_max_age_s, now=utcnow())
        webhook.validate_request(incoming)
        batch = webhook.parse_events(incoming)
        if batch.rejected:
            log.warning("%s: %d of %d reports rejected", webhook.label, len(batch.rejected),
                        len(batch.events) + len(batch.rejected))
        if webhook.grouped_commit:
            result = await grouped.store(batch.events)
        else:
            result = await _store(engine, batch.events, webhook.label)
        return _response(await webhook.answer(batch, result, context))

    return handle


def _response(answer: WebhookAnswer) -> Response:
    if answer.json is not None:
        return JSONResponse(answer.json, status_code=answer.status)
    return Response(content=answer.content, status_code=answer.status, media_type=answer.media_type)


class _Context:
    """What webhooks may ask of the receiver (:class:`channels.base.WebhookContext`): replies to members."""

    def __init__(self, config: ReceiverConfig, engine: Engine, linkers: Mapping[str, LineLinker]):
        self.config, self.engine, self.linkers = config, engine, linkers

    async def link_accounts(self, provider: str, events: Sequence[EngagementEvent],
                            member_ids: Sequence[int | None]) -> Mapping[str, int]:
        linker = self.linkers.get(provider)
        if linker is None:
            return {}
        return await run_in_threadpool(linker.apply, events, member_ids)

    async def member_locale(self, member_id: int | None) -> str:
        locale = await run_in_threadpool(_member_locale, self.engine, member_id)
        return locale or self.config.shop_locale

    def reply_text(self, kind: str, locale: str) -> str:
        shop = self.config.shop_name_for(pages.language(locale, pages.SMS_TEXT))
        return pages.sms_reply(kind, locale, shop=shop, support=self.config.support_contact)


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
