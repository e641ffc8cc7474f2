"""Webhook signatures: what the sandbox signs, the receiver's verify functions accept, and nothing else."""

from __future__ import annotations

import base64
import json
import time

import pytest

from channels.fcm.webhooks import sign_push_tracking, verify_push_tracking
from channels.sendgrid.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SendGridWebhookSigner,
    signature_headers,
    verify_sendgrid_signature,
)
from channels.twilio.webhooks import twilio_signature, verify_twilio_signature

BODY = json.dumps([{"email": "mei@example.com", "event": "delivered", "sg_event_id": "abc",
                    "membercare_message_id": "m-1", "timestamp": 1764000000}]).encode()


@pytest.fixture(scope="module")
def signer() -> SendGridWebhookSigner:
    return SendGridWebhookSigner.from_seed(3)


def test_sendgrid_signature_round_trip_and_sdk_verifier_agree(signer):
    headers = signer.sign(BODY)
    sig, ts = signature_headers({k.lower(): v for k, v in headers.items()})
    assert verify_sendgrid_signature(signer.public_key_b64, BODY, sig, ts)
    # Independently, the SDK helper alone accepts it too (we add only the freshness check around it).
    from sendgrid.helpers.eventwebhook import EventWebhook

    assert EventWebhook(signer.public_key_b64).verify_signature(BODY.decode(), headers[SIGNATURE_HEADER],
                                                                headers[TIMESTAMP_HEADER])


def test_sendgrid_signature_rejects_tampering_other_keys_replays_and_garbage(signer):
    now = int(time.time())
    headers = signer.sign(BODY, timestamp=now)
    sig, ts = headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
    assert not verify_sendgrid_signature(signer.public_key_b64, BODY.replace(b"delivered", b"bounce"), sig, ts)
    assert not verify_sendgrid_signature(signer.public_key_b64, BODY, sig, str(now + 1))  # timestamp is signed
    other = SendGridWebhookSigner.generate()
    assert not verify_sendgrid_signature(other.public_key_b64, BODY, sig, ts)
    assert not verify_sendgrid_signature(signer.public_key_b64, BODY, sig, ts, now=now + 301)  # replay window
    assert verify_sendgrid_signature(signer.public_key_b64, BODY, sig, ts, now=now + 299)
    assert not verify_sendgrid_signature(signer.public_key_b64, BODY, "not base64 !!", ts)  # SDK would raise
    assert not verify_sendgrid_signature(signer.public_key_b64, BODY, None, ts)
    assert not verify_sendgrid_signature(signer.public_key_b64, BODY, sig, "yesterday")
    assert not verify_sendgrid_signature("bm90IGEga2V5", BODY, sig, ts)  # undecodable key: False, not a crash


def test_sendgrid_signer_from_seed_is_stable_and_exposes_a_der_p256_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    a, b = SendGridWebhookSigner.from_seed(42), SendGridWebhookSigner.from_seed(42)
    assert a.public_key_b64 == b.public_key_b64 != SendGridWebhookSigner.from_seed(43).public_key_b64
    key = load_der_public_key(base64.b64decode(a.public_key_b64))
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_twilio_signature_round_trip_with_query_string_and_blank_values():
    url = "https://shop.example/webhooks/twilio/status?mid=m-1&ik=camp%3A1%3Amember-9"
    params = {"MessageSid": "SM123", "MessageStatus": "delivered", "ErrorCode": "", "To": "+886912345678"}
    sig = twilio_signature("token-1", url, params)
    assert verify_twilio_signature("token-1", url, params, sig)
    assert not verify_twilio_signature("token-2", url, params, sig)
    assert not verify_twilio_signature("token-1", url, {**params, "MessageStatus": "undelivered"}, sig)
    assert not verify_twilio_signature("token-1", url.replace("m-1", "m-2"), params, sig)
    assert not verify_twilio_signature("token-1", url, {k: v for k, v in params.items() if k != "ErrorCode"}, sig)
    assert not verify_twilio_signature("token-1", url, params, None)
    # The documented algorithm, computed by hand: HMAC-SHA1(url + sorted name+value pairs), base64.
    import hashlib
    import hmac

    data = url + "".join(k + params[k] for k in sorted(params))
    assert sig == base64.b64encode(hmac.new(b"token-1", data.encode(), hashlib.sha1).digest()).decode()


def test_push_tracking_hmac_round_trip():
    body = b'{"event":"opened","message_id":"m-1"}'
    sig = sign_push_tracking("s3cret", body)
    assert sig.startswith("sha256=") and verify_push_tracking("s3cret", body, sig)
    assert not verify_push_tracking("other", body, sig)
    assert not verify_push_tracking("s3cret", body + b" ", sig)
    assert not verify_push_tracking("s3cret", body, sig[7:])  # prefix required
    assert not verify_push_tracking("s3cret", body, "sha256=zz")
    assert not verify_push_tracking("", body, sig)
    with pytest.raises(ValueError):
        sign_push_tracking("", body)
