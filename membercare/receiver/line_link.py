"""The receiver's side of LINE's account-link flow: nonces, the routes that mint them, and the link itself.

The steps (LINE's side is :mod:`channels.line.link`; docs/line.md shows the whole sequence):

1. A follower writes 綁定 / "link" to the account, or follows it while no member has their user id: the
   LINE webhook's answer (:meth:`LineLinker.apply`) issues a link token for that user id and replies with
   ``MEMBERCARE_LINE_LOGIN_URL?linkToken=...`` (the shop's login page).
2. The shop authenticates the member, then asks us for the redirect, either
   ``POST /line/link`` (server to server, JSON ``{"member": "<external id>", "linkToken": "..."}`` signed
   like ``/triggers``: ``X-Membercare-Signature: sha256=<hex HMAC-SHA256 of the body>`` with
   ``MEMBERCARE_TRIGGER_SECRET``), answered ``{"redirect": <LINE dialog URL>, "expires_at": ...}``; or
   ``GET /u/{token}/line?linkToken=...`` with our signed preference-centre link (scope ``all``), answered
   303 to LINE's dialog.
   Either way a fresh random nonce (128 bits and more, URL-safe) is stored as its SHA-256 with the member and
   an expiry (``MEMBERCARE_LINE_LINK_TTL_S``, default 600 s, LINE's link-token life), in ``line_link_nonces``.
3. LINE sends ``accountLink`` with ``link.result`` and ``link.nonce``. :func:`consume_nonce` spends the nonce
   in one conditional UPDATE (``used_at IS NULL AND expires_at > now``), so of any number of deliveries,
   concurrent or replayed, exactly one succeeds; an unknown, used or expired nonce is refused and nothing
   changes. ``result: ok`` sets the member's ``line_user_id``; ``failed`` spends the nonce and links nothing.

A LINE user id already on another member moves to the member who just proved both identities (LINE signed
the event from that user; the shop authenticated the member): one LINE account is one member (the column is
unique), and the newest link is the one the person made. The member's previous LINE id, if any, is replaced.
The member's LINE marketing consent is granted (source ``line_follow``) when they have no LINE marketing
statement yet and the user id is not suppressed: the follow that opted them in came before we knew whose it
was. An explicit earlier refusal is kept.

Nothing here logs a nonce, a link token or a user id in full.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.engine import Connection, Engine
from starlette.concurrency import run_in_threadpool

from channels.fcm.webhooks import SIGNATURE_HEADER, verify_push_tracking
from channels.line.events import AccountLink, LinkRequest, account_link, link_request
from channels.line.link import (
    ACCOUNT_LINK_URL,
    LINK_TOKEN_PARAM,
    LineLinkClient,
    dialog_url,
    login_link,
    usable_link_token,
)
from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.delivery.contract import redact
from membercare.delivery.models import Suppression, address_hash
from membercare.engagement.events import EngagementEvent, MalformedPayload, loads_json, usable_id
from membercare.engagement.store import take_write_lock, writer_lock
from membercare.errors import InputError
from membercare.links import LinkScope, verify_member_token
from membercare.models import Channel, ConsentSource, Member, Purpose
from membercare.timeutil import UTCDateTime, utcnow

if TYPE_CHECKING:
    from membercare.receiver.config import ReceiverConfig

log = logging.getLogger(__name__)

NONCE_BYTES = 24  # 192 bits: 32 URL-safe characters (LINE takes 10 to 255)
DEFAULT_TTL_S = 600.0
KEEP_EXPIRED = timedelta(days=7)  # spent and expired nonces stay this long (who linked what, when)

_meta = sa.MetaData()
NONCES = sa.Table(
    "line_link_nonces", _meta,
    sa.Column("nonce_hash", sa.String(64), primary_key=True),
    sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
    sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
    sa.Column("used_at", UTCDateTime(timezone=True), nullable=True),
    sa.Column("line_user_id", sa.String(64), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=True),
)


class LinkOutcome(StrEnum):
    LINKED = "linked"  # the member now has the user id
    FAILED = "failed"  # LINE reported the link failed: the nonce is spent, nothing linked
    UNKNOWN = "unknown"  # no such nonce (forged, or minted by another installation)
    USED = "used"  # spent before (a replay)
    EXPIRED = "expired"
    INVALID = "invalid"  # the event has no user id or no nonce


def nonce_hash(nonce: str) -> str:
    return hashlib.sha256(nonce.encode("utf-8")).hexdigest()


def mint_nonce(conn: Connection, member_id: int, *, now: datetime, ttl_s: float = DEFAULT_TTL_S) -> str:
    """A fresh single-use nonce for ``member_id``, valid ``ttl_s`` seconds from ``now`` (its hash is stored).

    Rows that expired more than :data:`KEEP_EXPIRED` ago go at the same time (used or not: they can never be
    spent again), so the table holds about a week of link attempts."""
    conn.execute(sa.delete(NONCES).where(NONCES.c.expires_at < now - KEEP_EXPIRED))
    nonce = secrets.token_urlsafe(NONCE_BYTES)
    conn.execute(sa.insert(NONCES).values(nonce_hash=nonce_hash(nonce), member_id=member_id, created_at=now,
                                          expires_at=now + timedelta(seconds=ttl_s)))
    return nonce


@dataclass(frozen=True)
class LinkResult:
    outcome: LinkOutcome
    member_id: int | None = None
    moved_from: int | None = None  # the member who had this LINE user id before


def consume_nonce(conn: Connection, link: AccountLink, *, now: datetime) -> LinkResult:
    """Spend ``link.nonce`` once and, when LINE says ``ok``, link the user id to the nonce's member.

    Runs in the caller's transaction. Refused (nothing written) for an event without a user id or nonce and
    for a nonce that is unknown, already used or expired."""
    if not link.nonce or not link.user_id:
        return LinkResult(LinkOutcome.INVALID)
    digest = nonce_hash(link.nonce)
    outcome = LinkOutcome.LINKED if link.ok else LinkOutcome.FAILED
    spent = conn.execute(
        sa.update(NONCES)
        .where(NONCES.c.nonce_hash == digest, NONCES.c.used_at.is_(None), NONCES.c.expires_at > now)
        .values(used_at=now, line_user_id=link.user_id if link.ok else None, outcome=outcome.value)
        .returning(NONCES.c.member_id)
    ).first()
    if spent is None:
        row = conn.execute(sa.select(NONCES.c.used_at).where(NONCES.c.nonce_hash == digest)).first()
        if row is None:
            return LinkResult(LinkOutcome.UNKNOWN)
        return LinkResult(LinkOutcome.USED if row.used_at is not None else LinkOutcome.EXPIRED)
    member_id = int(spent.member_id)
    if not link.ok:
        return LinkResult(LinkOutcome.FAILED, member_id)
    moved_from = link_member(conn, member_id, link.user_id, now=now)
    return LinkResult(LinkOutcome.LINKED, member_id, moved_from)


def link_member(conn: Connection, member_id: int, user_id: str, *, now: datetime) -> int | None:
    """Give ``member_id`` the LINE ``user_id`` (taken from any other member first); returns that other member."""
    m = Member.__table__
    holder = conn.execute(sa.select(m.c.id).where(m.c.line_user_id == user_id)).scalar()
    moved_from = holder if holder is not None and holder != member_id else None
    if moved_from is not None:
        conn.execute(sa.update(m).where(m.c.id == moved_from).values(line_user_id=None, updated_at=now))
    if holder != member_id:
        conn.execute(sa.update(m).where(m.c.id == member_id).values(line_user_id=user_id, updated_at=now))
    s = Suppression.__table__
    suppressed = conn.execute(sa.select(s.c.id).where(
        s.c.channel == Channel.LINE.value, s.c.address_hash == address_hash(Channel.LINE, user_id))).first()
    key = (Channel.LINE.value, Purpose.MARKETING.value)
    if suppressed is None and key not in current_consents(conn, member_id):
        record_consents(conn, [ConsentStatement(member_id=member_id, channel=Channel.LINE.value,
                                                purpose=Purpose.MARKETING.value, granted=True,
                                                source=ConsentSource.LINE_FOLLOW.value, occurred_at=now,
                                                detail="LINE account link")])
    return moved_from


PROMPT = {
    "zh": "請在 10 分鐘內點選以下連結，登入{shop}會員以綁定 LINE 帳號：\n{url}",
    "en": "To link your LINE account with your {shop} membership, log in within 10 minutes:\n{url}",
}


def prompt_text(locale: str, shop: str, url: str) -> str:
    return PROMPT["zh" if locale.lower().startswith("zh") else "en"].format(shop=shop, url=url)


@dataclass
class LineLinker:
    """The account-link flow for one receiver: nonces in ``engine``, link tokens and prompts through
    ``client`` (``None``: no channel access token, so nobody is prompted; links still complete)."""

    engine: Engine
    client: LineLinkClient | None
    login_url: str | None
    account_link_url: str = ACCOUNT_LINK_URL
    ttl_s: float = DEFAULT_TTL_S
    shop: str = "membercare"
    locale: str = "zh-TW"
    clock: Callable[[], datetime] = utcnow

    def start(self, member_id: int, link_token: str) -> tuple[str, datetime]:
        """Mint a nonce for ``member_id``: LINE's dialog URL for ``link_token`` with it, and its expiry."""
        now = self.clock()
        with writer_lock(self.engine), self.engine.begin() as conn:
            take_write_lock(conn)
            nonce = mint_nonce(conn, member_id, now=now, ttl_s=self.ttl_s)
        return dialog_url(link_token, nonce, self.account_link_url), now + timedelta(seconds=self.ttl_s)

    def apply(self, events: Sequence[EngagementEvent], member_ids: Sequence[int | None]) -> Mapping[str, int]:
        """The ``accountLink`` events spend their nonces (one transaction each), then the link requests get
        their prompt. Returns ``{outcome: count}`` (``linked``, ``used``, ..., ``prompted``, ``prompt_failed``)."""
        done: dict[str, int] = {}
        requests: list[tuple[LinkRequest, str]] = []
        for event, member in zip(events, member_ids, strict=False):
            raw: Any = event.raw
            if not isinstance(raw, dict):
                continue
            link = account_link(raw)
            if link is not None:
                result = self.link(link)
                done[result.outcome.value] = done.get(result.outcome.value, 0) + 1
                continue
            request = link_request(raw, linked=member is not None)
            if request is not None:
                requests.append((request, event.dedupe_key))
        for request, key in requests:
            outcome = self.prompt(request, key)
            done[outcome] = done.get(outcome, 0) + 1
        return done

    def link(self, link: AccountLink) -> LinkResult:
        now = self.clock()
        with writer_lock(self.engine), self.engine.begin() as conn:
            take_write_lock(conn)
            result = consume_nonce(conn, link, now=now)
        if result.outcome is LinkOutcome.LINKED:
            log.info("LINE user %s linked to member %s%s", redact(link.user_id), result.member_id,
                     f" (moved from member {result.moved_from})" if result.moved_from else "")
        else:
            log.warning("LINE account link refused: %s nonce (user %s)", result.outcome.value, redact(link.user_id))
        return result

    def prompt(self, request: LinkRequest, key: str) -> str:
        """Issue a link token for the follower and send them the login link; ``prompted`` or why not."""
        if self.client is None or not self.login_url:
            return "prompt_not_configured"
        from linebot.v3.messaging.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            token = self.client.issue_link_token(request.user_id)
            text = prompt_text(self.locale, self.shop, login_link(self.login_url, token))
            self.client.send_text(request.user_id, text, reply_token=request.reply_token, key=f"link:{key}")
        except (ApiException, HTTPError) as exc:
            status = getattr(exc, "status", None)
            log.warning("LINE link prompt for %s failed (%s%s)", redact(request.user_id), type(exc).__name__,
                        f" {status}" if status else "")
            return "prompt_failed"
        return "prompted"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def line_linker(config: ReceiverConfig, engine: Engine, clock: Callable[[], datetime] = utcnow) -> LineLinker:
    """The receiver's :class:`LineLinker` from its configuration (a LINE client only with an access token)."""
    from channels.line.adapter import LineConfig

    client = None
    if config.line_access_token:
        client = LineLinkClient(LineConfig(channel_access_token=config.line_access_token,
                                           base_url=config.line_base_url))
    return LineLinker(engine, client, config.line_login_url, config.line_account_link_url, config.line_link_ttl_s,
                      shop=config.shop_name_for(config.shop_locale), locale=config.shop_locale, clock=clock)


# ---------------------------------------------------------------------------------------------------------------------
# Routes

MAX_BODY = 4 * 1024


def mount_line_link(app: FastAPI, config: ReceiverConfig, engine: Engine, linker: LineLinker) -> None:
    """``POST /line/link`` (the shop's backend, signed) and ``GET /u/{token}/line`` (our member link)."""
    def error(status: int, detail: str) -> Response:
        return JSONResponse({"error": detail}, status_code=status, headers={"Cache-Control": "no-store"})

    @app.post("/line/link")
    async def line_link(request: Request) -> Response:
        if not config.trigger_secret:
            return error(503, "MEMBERCARE_TRIGGER_SECRET is not configured")
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return error(401, "missing signature")
        body = await request.body()
        if not verify_push_tracking(config.trigger_secret, body, signature):
            return error(403, "bad signature")
        try:
            data = loads_json(body)
        except MalformedPayload as exc:
            return error(400, str(exc))
        member = data.get("member") if isinstance(data, dict) else None
        token = usable_link_token(data.get(LINK_TOKEN_PARAM)) if isinstance(data, dict) else None
        if not isinstance(member, str) or usable_id(member, 64) is None or token is None:
            return error(400, f"body must be a JSON object with a member (external id) and a {LINK_TOKEN_PARAM}")
        member_id = await run_in_threadpool(_member_by_external_id, engine, member)
        if member_id is None:
            return error(404, "unknown member")
        url, expires = await run_in_threadpool(linker.start, member_id, token)
        return JSONResponse({"redirect": url, "expires_at": expires.isoformat()},
                            headers={"Cache-Control": "no-store"})

    @app.get("/u/{token}/line")
    async def line_link_from_member_link(token: str, request: Request) -> Response:
        if not config.secret_key:
            return error(503, "MEMBERCARE_SECRET_KEY is not configured")
        try:
            claims = verify_member_token(token, config.link_secrets)
        except InputError:
            return error(404, "this link is not valid")
        if claims.scope is not LinkScope.ALL:
            return error(403, "this link cannot link a LINE account")
        link_token = usable_link_token(request.query_params.get(LINK_TOKEN_PARAM))
        if link_token is None:
            return error(400, f"missing or malformed {LINK_TOKEN_PARAM}")
        if await run_in_threadpool(_member_exists, engine, claims.member_id) is False:
            return error(404, "unknown member")
        url, _ = await run_in_threadpool(linker.start, claims.member_id, link_token)
        # no-referrer: LINE's dialog must not see the member link in a Referer header.
        return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store",
                                                               "Referrer-Policy": "no-referrer"})


def _member_by_external_id(engine: Engine, external_id: str) -> int | None:
    m = Member.__table__
    with engine.connect() as conn:
        return conn.execute(sa.select(m.c.id).where(m.c.external_id == external_id)).scalar()


def _member_exists(engine: Engine, member_id: int) -> bool:
    if not 0 < member_id <= 2**63 - 1:
        return False
    m = Member.__table__
    with engine.connect() as conn:
        return conn.execute(sa.select(m.c.id).where(m.c.id == member_id)).first() is not None
