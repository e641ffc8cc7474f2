"""App-reported push tracking (``POST /track/push``): the signature scheme and the payload shape.

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

SIGNATURE_HEADER = "X-Membercare-Signature"
_PREFIX = "sha256="
PUSH_EVENTS = ("received", "opened", "dismissed")


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
