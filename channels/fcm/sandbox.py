"""FCM v1's and Google OAuth's wire formats as the provider sandbox speaks them: message validation, error
bodies and the JWT-bearer assertion check.

Pure functions (no I/O), shaped like the real API, so that they can be unit-tested and read in one place; the
request pipeline (credentials, faults, rate limits, recording) is the sandbox's
(``membercare/sandbox/endpoints.py`` and ``pipeline.py``).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any


def fcm_error(status: int, grpc_status: str, message: str, error_code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if error_code:
        error["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
    return {"error": error}


def fcm_unregistered() -> dict[str, Any]:
    return fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")


def fcm_quota_exceeded() -> dict[str, Any]:
    return fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send messages'.", "QUOTA_EXCEEDED")


def fcm_unauthenticated() -> dict[str, Any]:
    return fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 "
                     "access token, login cookie or other valid authentication credential.")


def validate_fcm_message(body: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(message, None)`` when valid, else ``(None, INVALID_ARGUMENT message)``."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return None, "Request contains an invalid argument."
    msg = body["message"]
    targets = [k for k in ("token", "topic", "condition", "fid") if msg.get(k)]
    if len(targets) != 1:
        return None, "Exactly one of token, topic, condition or fid must be specified."
    data = msg.get("data")
    if data is not None:
        if not isinstance(data, dict):
            return None, "Invalid value at 'message.data'"
        for i, (k, v) in enumerate(data.items()):
            if not isinstance(v, str):
                return None, f"Invalid value at 'message.data[{i}].value' (TYPE_STRING)"
            if k in ("from", "notification", "message_type") or k.startswith(("google.", "gcm.")):
                return None, f"Invalid data payload key: {k}"
    if msg.get("token") and len(msg["token"]) < 8:
        return None, "The registration token is not a valid FCM registration token"
    return msg, None


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def check_jwt_assertion(assertion: str, *, token_url_path: str, public_keys: dict[str, str],
                        require_known: bool, now: float | None = None) -> tuple[str | None, str | None]:
    """Check a Google service-account JWT-bearer assertion. ``(client_email, None)`` or ``(None, error)``.

    The claims are always checked (issuer, audience = our token endpoint, expiry); the RS256 signature is
    verified when the issuer's public key is registered (``fcm_service_accounts``).
    """
    try:
        head_b64, claims_b64, sig_b64 = assertion.split(".")
        header = json.loads(_b64url(head_b64))
        claims = json.loads(_b64url(claims_b64))
        signature = _b64url(sig_b64)
    except (ValueError, TypeError):
        return None, "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
    if header.get("alg") != "RS256":
        return None, "Invalid JWT Signature."
    iss, aud = claims.get("iss"), str(claims.get("aud") or "")
    current = time.time() if now is None else now
    if not iss or not aud.endswith(token_url_path):
        return None, "Invalid JWT: audience or issuer is wrong."
    if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] < current - 30 or \
            claims.get("iat", 0) > current + 300:
        return None, "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
    key_pem = public_keys.get(iss)
    if key_pem:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

        key = serialization.load_pem_public_key(key_pem.encode())
        if not isinstance(key, RSAPublicKey):
            return None, "Invalid JWT Signature."
        try:
            key.verify(signature, f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return None, "Invalid JWT Signature."
    elif require_known:
        return None, "Invalid grant: account not found"
    return str(iss), None
