"""``GET /r/{token}``: tracked short links. Verify, record the click of that message, redirect.

The token (:func:`membercare.links.verify_click_token`) names our message and the index of a link in it; the
original URL is read from the message's stored content (the ``links`` of the channel it was sent on), so
only URLs we rendered into that message are ever redirect targets: an unsigned, tampered or unknown token,
or an index the message does not have, gets a 404 page and no redirect (no open redirect).

A click is an engagement event (``clicked``, provider ``membercare``, the URL kept) of that message and
member, stored with its dedupe key ``click:<message id>:<link index>``: the first click of each link counts,
later ones are duplicates. Attribution and the optimisation layer count it like a provider's click.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from membercare.delivery.models import OutboxMessage, decode_contents
from membercare.engagement.events import EngagementEvent, EventKind, Provider
from membercare.engagement.store import ingest_events
from membercare.errors import InputError
from membercare.links import ClickClaims, verify_click_token
from membercare.receiver.config import ReceiverConfig
from membercare.timeutil import utcnow

log = logging.getLogger(__name__)
_HEADERS = {"Cache-Control": "no-store", "X-Robots-Tag": "noindex", "Referrer-Policy": "no-referrer"}
_NOT_FOUND = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Link</title></head><body>"
              "<p>This link is not valid. 此連結無效。</p></body></html>")


def mount_click_redirects(app: FastAPI, config: ReceiverConfig, engine: Engine) -> None:
    @app.get("/r/{token}")
    async def follow_link(token: str) -> Response:
        if not config.secret_key:
            return HTMLResponse(_NOT_FOUND, status_code=503, headers=_HEADERS)
        try:
            claims = verify_click_token(token, config.link_secrets)
        except InputError:
            return HTMLResponse(_NOT_FOUND, status_code=404, headers=_HEADERS)
        target = await run_in_threadpool(record_click, engine, claims)
        if target is None:
            return HTMLResponse(_NOT_FOUND, status_code=404, headers=_HEADERS)
        return RedirectResponse(target, status_code=302, headers=_HEADERS)


def record_click(engine: Engine, claims: ClickClaims) -> str | None:
    """The original URL of the link ``claims`` names, after storing its click; ``None`` when the message
    or that link does not exist."""
    o = OutboxMessage.__table__
    with engine.connect() as conn:
        row = conn.execute(sa.select(o.c.member_id, o.c.channel, o.c.content)
                           .where(o.c.message_id == claims.message_id)).first()
    if row is None or row.channel is None:
        return None
    links = getattr(decode_contents(row.content).get(row.channel), "links", ())
    if claims.index >= len(links):
        return None
    url = str(links[claims.index])
    if urlsplit(url).scheme not in ("http", "https"):
        return None
    event = EngagementEvent(provider=Provider.MEMBERCARE, dedupe_key=f"click:{claims.message_id}:{claims.index}",
                            kind=EventKind.CLICKED, channel=row.channel, occurred_at=utcnow(),
                            raw={"source": "short_link", "link": claims.index}, message_id=claims.message_id,
                            url=url, member_id=row.member_id)
    ingest_events(engine, [event])
    return url
