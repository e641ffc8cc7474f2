"""SendGrid Signed Event Webhook: signing (for the sandbox and tests), verification and the receiver's endpoint.

SendGrid signs every Event Webhook POST with ECDSA P-256 / SHA-256 over ``timestamp + raw_body`` and
sends the base64 DER signature and the timestamp in two headers. The account's verification key is the
base64 DER (SubjectPublicKeyInfo) public key shown under Mail Settings, which the receiver reads from
``MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY``.

Verification goes through the SDK's :class:`sendgrid.helpers.eventwebhook.EventWebhook` so that we check
exactly what SendGrid documents, with the two gaps of that helper closed here: a malformed (non-base64)
signature raises inside the SDK (we return ``False``), and the SDK has no timestamp-age check (we reject
signatures older or newer than ``tolerance_s`` against replay).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from channels.base import ConfigurationError, Webhook, WebhookBatch, WebhookRejected, WebhookRequest
from channels.sendgrid.events import parse_sendgrid_body
from membercare.engagement.events import MalformedPayload

ENV_WEBHOOK_PUBLIC_KEY = "MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
DEFAULT_TOLERANCE_S = 300.0
# The names of the store's cleaned fields in SendGrid's payload (see ``membercare.engagement.store._usable``).
CLEANED_FIELDS = {"recipient": "email", "message_id": "membercare_message_id",
                  "provider_message_id": "sg_message_id", "dedupe_key": "sg_event_id"}


class SendGridWebhookSigner:
    """An ECDSA P-256 key pair that signs Event Webhook batches the way SendGrid does.

    Only the sandbox and tests sign; production receives SendGrid's signatures and only needs
    :attr:`public_key_b64` (what SendGrid calls the verification key).
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("SendGrid signs with P-256 (secp256r1)")
        self._key = private_key
        der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_b64 = base64.b64encode(der).decode("ascii")

    @classmethod
    def generate(cls) -> SendGridWebhookSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_seed(cls, seed: int | str) -> SendGridWebhookSigner:
        """A key pair derived from ``seed``: a sandbox restarted with the same seed keeps its public key,
        so ``MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY`` can be set once. Never use for real keys."""
        digest = hashlib.sha256(f"membercare-sandbox-sendgrid-webhook:{seed}".encode()).digest()
        # P-256's order is just below 2**256; reduce into [1, n-1].
        order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
        value = int.from_bytes(digest, "big") % (order - 1) + 1
        return cls(ec.derive_private_key(value, ec.SECP256R1()))

    def sign(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The two signature headers for ``body`` (the exact bytes that will be posted)."""
        ts = str(int(time.time()) if timestamp is None else int(timestamp))
        signature = self._key.sign(ts.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
        return {SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii"), TIMESTAMP_HEADER: ts}


def verify_sendgrid_signature(
    public_key_b64: str,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``signature`` is SendGrid's valid signature of ``timestamp + body`` and fresh enough.

    ``body`` must be the raw bytes as received: re-serialised JSON does not verify.
    """
    from sendgrid.helpers.eventwebhook import EventWebhook

    if not signature or not timestamp:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    try:
        base64.b64decode(signature, validate=True)
        payload = body.decode("utf-8")
    except (binascii.Error, ValueError):
        return False
    try:
        return bool(EventWebhook(public_key_b64).verify_signature(payload, signature, timestamp))
    except (ValueError, TypeError):
        # An undecodable public key is a configuration problem, but an attacker must not be able to
        # tell it apart from a bad signature: the receiver checks the key once at start-up instead.
        return False


def signature_headers(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(signature, timestamp)`` from a case-insensitive or plain header mapping."""
    lower = {k.lower(): v for k, v in headers.items()}
    return lower.get(SIGNATURE_HEADER.lower()), lower.get(TIMESTAMP_HEADER.lower())


def check_public_key(key: str) -> None:
    """Fail at start-up, not on the first webhook, when the verification key is not a P-256 public key."""
    from sendgrid.helpers.eventwebhook import EventWebhook

    try:
        loaded = EventWebhook().convert_public_key_to_ecdsa(key)
    except (ValueError, TypeError):
        raise ConfigurationError(
            f"{ENV_WEBHOOK_PUBLIC_KEY} is not a base64 DER public key (copy it from SendGrid's Event Webhook settings)"
        ) from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise ConfigurationError(f"{ENV_WEBHOOK_PUBLIC_KEY} is not an ECDSA P-256 key")


class SendGridEventWebhook(Webhook):
    """``POST /webhooks/sendgrid``: the signed Event Webhook, about a thousand events per request, stored in
    one bulk insert. An event whose ids or address cannot be used is stored without them and listed under
    ``"cleaned"`` (by SendGrid's field names) in the answer."""

    path = "/webhooks/sendgrid"
    label = "sendgrid"
    secret_missing = "SendGrid webhook verification key is not configured"
    body_limit = None  # the receiver's batch limit (max_body_bytes): SendGrid posts ~1000 events of ~1 KB

    def check_headers(self, headers: Mapping[str, str]) -> None:
        if not headers.get(SIGNATURE_HEADER) or not headers.get(TIMESTAMP_HEADER):
            raise WebhookRejected(401, "missing SendGrid signature headers")

    def validate_request(self, request: WebhookRequest) -> None:
        signature, timestamp = request.headers.get(SIGNATURE_HEADER), request.headers.get(TIMESTAMP_HEADER)
        if not verify_sendgrid_signature(request.secret, request.body, signature, timestamp,
                                         tolerance_s=request.tolerance_s, now=request.now.timestamp()):
            raise WebhookRejected(403, "invalid or expired signature", log_message=(
                f"rejected SendGrid webhook: bad or stale signature ({len(request.body)} bytes)"))

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        try:
            events = parse_sendgrid_body(request.body)
        except MalformedPayload as exc:
            raise WebhookRejected(400, str(exc)) from None
        return WebhookBatch(events, fields=CLEANED_FIELDS)
