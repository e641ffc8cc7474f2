"""Twilio request signatures (``X-Twilio-Signature``) for status callbacks and inbound messages.

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

SIGNATURE_HEADER = "X-Twilio-Signature"


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    from twilio.request_validator import RequestValidator

    return RequestValidator(auth_token).compute_signature(url, dict(params))


def verify_twilio_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str | None) -> bool:
    """True when ``signature`` is Twilio's signature of ``url`` + ``params`` under ``auth_token``."""
    from twilio.request_validator import RequestValidator

    if not signature or not auth_token:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))
