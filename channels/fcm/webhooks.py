"""App-reported push tracking (``POST /track/push``): the signature scheme, the payload shape and the endpoint.

FCM reports nothing back to the sender about delivery or opens, so the shop's app reports them itself:
when a notification is received, opened or dismissed it posts JSON to ``/track/push``, authenticated
with an HMAC-SHA256 of the raw body under the shared secret ``MEMBERCARE_PUSH_TRACKING_SECRET``::

    X-Membercare-Signature: sha256=<hex digest>

    {"event_id": "...",              # unique per report: the receiver stores a report once
     "message_id": "...",            # our message id, from the FCM data key ``membercare_message_id``
     "idempotency_key": "...",       # optional, from ``membercare_idempotency_key``
     "event": "received" | "opened" | "dismissed",
     "occurred_at": "2025-01-31T12:00:00Z",   # covered by the HMAC: the receiver bounds its age
     "platform": "android" | "ios" | "web"}

The timestamp is inside the signed body (there is no separate header to forge), and ``event_id`` makes
replays of a captured request harmless.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import timedelta

from channels.base import Webhook, WebhookBatch, WebhookRejected, WebhookRequest
from channels.fcm.events import parse_push_reports
from membercare.engagement.events import MalformedPayload

ENV_TRACKING_SECRET = "MEMBERCARE_PUSH_TRACKING_SECRET"
SIGNATURE_HEADER = "X-Membercare-Signature"
_PREFIX = "sha256="
PUSH_EVENTS = ("received", "opened", "dismissed")
# An app flushing its offline queue sends at most 1000 small reports.
MAX_BODY = 4 * 1024 * 1024


def sign_push_tracking(secret: str, body: bytes) -> str:
    """The ``X-Membercare-Signature`` header value for ``body``."""
    if not secret:
        raise ValueError("push tracking secret is empty")
    return _PREFIX + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_push_tracking(secret: str, body: bytes, signature: str | None) -> bool:
    """Constant-time check of an ``X-Membercare-Signature`` header against the raw body."""
    if not secret or not signature or not signature.startswith(_PREFIX):
        return False
    expected = sign_push_tracking(secret, body)
    return hmac.compare_digest(expected.encode("ascii"), signature.strip().encode("ascii", "replace"))


class PushTrackingWebhook(Webhook):
    """``POST /track/push``: the shop's app reports pushes received, opened, dismissed (and dead tokens).

    Reports are judged one by one: a report without a usable id or time, or outside the accepted time
    window, is refused alone (listed under ``"rejected"`` with its index) and the valid ones beside it are
    stored. A request with nothing valid is 403 when its reports were only too old or too new (a replayed
    capture), else 400.
    """

    path = "/track/push"
    label = "push"
    secret_missing = "push tracking secret is not configured"
    body_limit = MAX_BODY

    def check_headers(self, headers: Mapping[str, str]) -> None:
        if not headers.get(SIGNATURE_HEADER):
            raise WebhookRejected(401, f"missing {SIGNATURE_HEADER}")

    def validate_request(self, request: WebhookRequest) -> None:
        if not verify_push_tracking(request.secret, request.body, request.headers.get(SIGNATURE_HEADER)):
            raise WebhookRejected(403, "invalid signature")

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        try:
            parsed, refused = parse_push_reports(request.body)
        except MalformedPayload as exc:
            raise WebhookRejected(400, str(exc)) from None
        rejected = [(r.index, r.error) for r in refused]
        # The report's time is inside the signed body; bound it so that a captured request cannot be
        # replayed forever (within the window the dedupe key makes a replay a no-op). Each report is
        # judged alone: an app flushing its offline queue keeps its fresh reports beside a stale one.
        oldest = request.now - timedelta(seconds=request.max_age_s)
        newest = request.now + timedelta(seconds=request.tolerance_s)
        fresh = [(i, e) for i, e in parsed if oldest <= e.occurred_at <= newest]
        stale = [(i, "occurred_at outside the accepted window") for i, e in parsed
                 if not oldest <= e.occurred_at <= newest]
        if not fresh:
            # Nothing to store: a replayed capture (403), or nothing valid at all (400).
            if stale:
                raise WebhookRejected(403, "report timestamp outside the accepted window")
            raise WebhookRejected(400, rejected[0][1] if len(rejected) == 1 else
                                  f"no valid report ({len(rejected)} rejected; the first: {rejected[0][1]})")
        return WebhookBatch([e for _, e in fresh], rejected=sorted(rejected + stale), positions=[i for i, _ in fresh])
