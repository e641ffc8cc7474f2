"""``POST /events``: the shop's systems report what members do (cart updates, orders, reviews, custom events).

Body: one event, a list, ``{"events": [...]}`` in our shape, or Segment/RudderStack ``track`` calls (one, a
list, or ``{"batch": [...]}``); see :mod:`membercare.journeys.events`. At most
:data:`~membercare.journeys.events.MAX_EVENTS` per request. Signed like ``POST /triggers/{event}``: header
``X-Membercare-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` with ``MEMBERCARE_TRIGGER_SECRET``
(the same shop systems call both); without the secret the endpoint answers 503.

Answers: 401/403 for a missing/wrong signature (checked before the body is parsed); 413 over ``MAX_BODY``;
400 for a body not of the documented shape (nothing stored); 503 when the database or the journey definitions
cannot be read (logged; retry); 200 with the counts otherwise: ``stored``, ``duplicates`` (event ids seen
before: a retried delivery is harmless), ``unknown_members`` (not stored), ``skipped`` (calls that are not
``track``), ``entered`` (journey instances started), ``woken`` (instances waiting for the event).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from channels.fcm.webhooks import SIGNATURE_HEADER, verify_push_tracking
from membercare.config import Settings
from membercare.db import in_transaction
from membercare.engagement.events import MalformedPayload, loads_json
from membercare.errors import InputError
from membercare.journeys.definition import list_journeys
from membercare.journeys.events import IngestReport, ingest, parse_events
from membercare.timeutil import utcnow

MAX_BODY = 1024 * 1024

log = logging.getLogger(__name__)


def build_events_router(engine: Engine, secret: str | None, settings: Settings | None = None, *,
                        clock: Callable[[], datetime] = utcnow) -> APIRouter:
    """The ``POST /events`` route (mount it in an app wrapped by ``BodyLimit``, as ``create_app`` does)."""
    router = APIRouter()
    settings = settings or Settings.from_env()

    @router.post("/events")
    async def events(request: Request) -> JSONResponse:
        if not secret:
            return JSONResponse({"error": "MEMBERCARE_TRIGGER_SECRET is not configured"}, status_code=503)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return JSONResponse({"error": "missing signature"}, status_code=401)
        body = await request.body()
        if not verify_push_tracking(secret, body, signature):
            return JSONResponse({"error": "bad signature"}, status_code=403)
        now = clock()
        try:
            parsed, skipped = parse_events(loads_json(body), now)
        except MalformedPayload as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

        def store() -> IngestReport:
            journeys = list_journeys(settings)
            return in_transaction(engine, lambda conn: ingest(conn, parsed, journeys, now))

        try:
            rep = await run_in_threadpool(store)
        except InputError as exc:
            # An invalid journey.yaml: nothing was stored, so the caller's retry after the fix loses nothing.
            log.error("events: journey definitions cannot be loaded (%s); answered 503", type(exc).__name__)
            return JSONResponse({"error": "journey definitions cannot be loaded; retry later"}, status_code=503)
        except Exception as exc:  # noqa: BLE001 - database unreachable: the caller should retry
            log.warning("events: could not store %d event(s) (%s); answered 503", len(parsed), type(exc).__name__)
            return JSONResponse({"error": "could not store the events; retry later"}, status_code=503)
        rep.skipped += skipped
        return JSONResponse(vars(rep), status_code=200)

    return router


__all__ = ["MAX_BODY", "build_events_router"]
