"""Twilio request signatures (``X-Twilio-Signature``) and the receiver's two endpoints: status callbacks
(``POST /webhooks/twilio/status``) and inbound messages (``POST /webhooks/twilio/inbound``).

Twilio signs each webhook with HMAC-SHA1 keyed by the account's auth token over the exact URL it
called followed by the POST parameters sorted by name (name + value concatenated, blank values kept),
base64-encoded. Both directions go through the SDK's :class:`twilio.request_validator.RequestValidator`,
so the sandbox signs exactly what the receiver verifies and what Twilio sends.

The URL must be the one Twilio called, including the query string (our status-callback URL carries
``?mid=...&ik=...``) and the scheme and host as Twilio saw them (behind a proxy: ``MEMBERCARE_PUBLIC_URL``,
not the internal address).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from channels.base import (
    Webhook,
    WebhookAnswer,
    WebhookBatch,
    WebhookContext,
    WebhookRejected,
    WebhookRequest,
)
from channels.twilio.adapter import STATUS_CALLBACK_PATH
from channels.twilio.events import parse_inbound, parse_status_callback, twilio_handles_reply
from membercare.engagement.events import EngagementEvent, InboundCommand, MalformedPayload

if TYPE_CHECKING:
    from membercare.engagement.store import IngestResult

SIGNATURE_HEADER = "X-Twilio-Signature"
INBOUND_PATH = "/webhooks/twilio/inbound"
# Twilio's form posts are a few KB; one limit for every path under /webhooks/twilio/.
MAX_BODY = 1024 * 1024


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    from twilio.request_validator import RequestValidator

    return RequestValidator(auth_token).compute_signature(url, dict(params))


def verify_twilio_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str | None) -> bool:
    """True when ``signature`` is Twilio's signature of ``url`` + ``params`` under ``auth_token``."""
    from twilio.request_validator import RequestValidator

    if not signature or not auth_token:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


class _TwilioWebhook(Webhook):
    """What both Twilio endpoints share: the form body and its signature over the URL Twilio called."""

    secret_missing = "Twilio auth token is not configured"
    body_limit = MAX_BODY
    body_limit_prefix = "/webhooks/twilio/"

    def check_headers(self, headers: Mapping[str, str]) -> None:
        if not headers.get(SIGNATURE_HEADER):
            raise WebhookRejected(401, f"missing {SIGNATURE_HEADER}")

    def validate_request(self, request: WebhookRequest) -> None:
        # Twilio signs the URL it called: our public base URL, the path and the query exactly as sent.
        if not verify_twilio_signature(request.secret, request.url, request.form,
                                       request.headers.get(SIGNATURE_HEADER)):
            raise WebhookRejected(403, "invalid signature",
                                  log_message=f"rejected Twilio webhook to {request.path}: bad signature")


class TwilioStatusWebhook(_TwilioWebhook):
    """Status callbacks: one event per request, so concurrent requests share a transaction (group commit);
    answered 204 once committed."""

    path = STATUS_CALLBACK_PATH
    label = "twilio status"
    grouped_commit = True

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        try:
            event = parse_status_callback(request.form, dict(request.query_params))
        except MalformedPayload as exc:
            raise WebhookRejected(400, str(exc)) from None
        return WebhookBatch([event])

    async def answer(self, batch: WebhookBatch, result: IngestResult, context: WebhookContext) -> WebhookAnswer:
        return WebhookAnswer(status=204)


class TwilioInboundWebhook(_TwilioWebhook):
    """Inbound SMS: STOP / START / HELP change consent (in the store); the answer is TwiML with our reply
    in the member's language, or none where Twilio's own opt-out handling already answered."""

    path = INBOUND_PATH
    label = "twilio inbound"

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        try:
            event = parse_inbound(request.form)
        except MalformedPayload as exc:
            raise WebhookRejected(400, str(exc)) from None
        return WebhookBatch([event])

    async def answer(self, batch: WebhookBatch, result: IngestResult, context: WebhookContext) -> WebhookAnswer:
        event = batch.events[0]
        reply = None
        # A sender number that could not be used changed nothing: no confirmation is sent to it.
        if event.command is not None and "recipient" not in result.cleaned.get(0, ()):
            member_id = result.member_ids[0] if result.member_ids else None
            reply = keyword_reply(event, await context.member_locale(member_id), context)
        return WebhookAnswer(content=twiml(reply), media_type="application/xml")


def keyword_reply(event: EngagementEvent, locale: str, context: WebhookContext) -> str | None:
    """Our SMS answer to a keyword, or ``None`` when Twilio's own opt-out handling already answered."""
    if event.command is InboundCommand.HELP:
        # Twilio answers HELP itself only with its generic text; carriers expect the sender's own help.
        return context.reply_text("help", locale)
    if twilio_handles_reply(str(event.raw.get("Body", ""))):
        return None
    return context.reply_text("stopped" if event.command is InboundCommand.STOP else "started", locale)


def twiml(reply: str | None) -> str:
    """A TwiML ``<Response>``, with one ``<Message>`` when there is a reply."""
    from twilio.twiml.messaging_response import MessagingResponse

    response = MessagingResponse()
    if reply:
        response.message(reply)
    return str(response)
