"""LINE webhook signatures (``X-Line-Signature``) and the receiver's endpoint ``POST /webhooks/line``.

LINE signs every webhook request with the channel secret: ``X-Line-Signature`` is the base64 of the
HMAC-SHA256 of the raw body. The receiver checks it over the exact bytes received with the SDK's
``linebot.v3.webhook.SignatureValidator`` (constant-time); the sandbox signs with :func:`line_signature`.
A body whose signature does not match is refused (403) before anything is parsed or stored.

The body's own time (each event's ``timestamp``) is not bounded: LINE redelivers failed webhooks for up to
a day with the original timestamps, and a replayed capture is harmless, since every event is stored once
by its ``webhookEventId``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

from channels.base import (
    Webhook,
    WebhookAnswer,
    WebhookBatch,
    WebhookContext,
    WebhookRejected,
    WebhookRequest,
    counts,
)
from channels.line.events import ACCOUNT_LINK, LINK_KEYWORDS, parse_body
from membercare.engagement.events import MalformedPayload, loads_json

if TYPE_CHECKING:
    from membercare.engagement.store import IngestResult

SIGNATURE_HEADER = "X-Line-Signature"
WEBHOOK_PATH = "/webhooks/line"
MAX_BODY = 1024 * 1024  # LINE batches a few events per request


def line_signature(channel_secret: str, body: bytes) -> str:
    """The ``X-Line-Signature`` of ``body`` under ``channel_secret``."""
    return base64.b64encode(hmac.new(channel_secret.encode("utf-8"), body, hashlib.sha256).digest()).decode("ascii")


def verify_line_signature(channel_secret: str, body: bytes, signature: str | None) -> bool:
    """True when ``signature`` is LINE's signature of ``body`` (the SDK's validator, constant-time)."""
    from linebot.v3.webhook import SignatureValidator

    if not channel_secret or not signature:
        return False
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(SignatureValidator(channel_secret).validate(text, signature.strip()))


class LineWebhook(Webhook):
    """``POST /webhooks/line``: follow, unfollow, message, postback and the other events of the channel."""

    path = WEBHOOK_PATH
    label = "line"
    secret_missing = "LINE channel secret is not configured"
    body_limit = MAX_BODY

    def check_headers(self, headers: Mapping[str, str]) -> None:
        if not headers.get(SIGNATURE_HEADER):
            raise WebhookRejected(401, f"missing {SIGNATURE_HEADER}")

    def validate_request(self, request: WebhookRequest) -> None:
        if not verify_line_signature(request.secret, request.body, request.headers.get(SIGNATURE_HEADER)):
            raise WebhookRejected(403, "invalid signature", log_message="rejected LINE webhook: bad signature")

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        try:
            events, rejected, positions = parse_body(loads_json(request.body))
        except MalformedPayload as exc:
            raise WebhookRejected(400, str(exc)) from None
        return WebhookBatch(events, rejected=rejected, positions=positions,
                            fields={"recipient": "source.userId", "message_id": "postback.data mid"})

    async def answer(self, batch: WebhookBatch, result: IngestResult, context: WebhookContext) -> WebhookAnswer:
        """Counts, plus what the account-link flow did once the events were committed: ``accountLink``
        events spend their nonce (and link the member), follows and link keywords get the login link."""
        body = counts(batch, result)
        if any(_may_link(e.raw) for e in batch.events):
            done = await context.link_accounts("line", batch.events, result.member_ids)
            if done:
                body["account_link"] = dict(done)
        return WebhookAnswer(json=body)


def _may_link(raw: object) -> bool:
    if not isinstance(raw, dict):
        return False
    if raw.get("type") in (ACCOUNT_LINK, "follow"):
        return True
    message = raw.get("message")
    return (raw.get("type") == "message" and isinstance(message, dict) and isinstance(message.get("text"), str)
            and len(message["text"]) <= 40 and any(k in message["text"].casefold() for k in LINK_KEYWORDS))
