"""End to end through the in-process sandbox with the real SDKs: every outcome each adapter must map."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest

from channels.base import (
    Accepted,
    ConfigurationError,
    EmailContent,
    FailureReason,
    OutboundMessage,
    PermanentFailure,
    PushContent,
    SmsContent,
    TransientFailure,
)
from channels.fcm.adapter import FirebaseConfig, FirebasePushChannel
from channels.registry import build_channels, close_channels
from channels.sendgrid.adapter import SendGridConfig, SendGridEmailChannel
from channels.twilio.adapter import TwilioConfig, TwilioSmsChannel
from membercare.models import Channel, Purpose
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import make_service_account

EMAIL = EmailContent(subject="Hi", html="<p>Hi <a href='https://shop.example/sale'>sale</a></p>", text="Hi")
SMS = SmsContent(body="Hi Mei: 20% off today", encoding="GSM-7", segments=1)
PUSH = PushContent(title="Sale", body="20% off today", data={"deeplink": "shop://sale"})
MOBILE, LANDLINE = "+886912345678", "+886223456780"


def message(channel: Channel, to: str, mid: str = "m-1") -> OutboundMessage:
    content = {Channel.EMAIL: EMAIL, Channel.SMS: SMS, Channel.PUSH: PUSH}[channel]
    return OutboundMessage(message_id=mid, idempotency_key=f"c1:o1:{mid}", channel=channel,
                           purpose=Purpose.MARKETING, to=to, content=content, campaign="c1", categories=("c1",))


def fast(adapter, timeout: float = 0.5):
    """The same adapter class with a short client timeout (for the hold-the-request fault)."""
    return type(adapter)(replace(adapter.config, timeout_s=timeout))


# ------------------------------------------------------------------------------------ accepted


def test_each_channel_is_accepted_with_our_ids_in_the_provider_request(sandbox, adapters):
    sandbox.configure(capture_requests=10)
    results = {ch: adapters[ch].send(message(ch, to, mid=f"m-{ch}"))
               for ch, to in [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE),
                              (Channel.PUSH, "device-token-0001")]}
    assert all(isinstance(r, Accepted) and r.provider_message_id for r in results.values()), results
    records = {r["channel"]: r for r in sandbox.messages()}
    for ch in results:  # (LINE carries no id of ours in a push: tests/test_line.py)
        assert records[ch.value]["message_id"] == f"m-{ch}"
        assert records[ch.value]["idempotency_key"] == f"c1:o1:m-{ch}"
        assert records[ch.value]["provider_id"] == results[ch].provider_message_id
    assert records["email"]["to"] == "m***@example.com"  # the record never shows full addresses
    bodies = {c["path"]: c["body"] for c in sandbox.captured()}
    fcm = json.loads(next(b for p, b in bodies.items() if p.endswith("messages:send")))["message"]
    assert fcm["token"] == "device-token-0001" and fcm["data"]["membercare_message_id"] == "m-push"
    assert fcm["data"]["deeplink"] == "shop://sale"
    assert fcm["notification"] == {"title": "Sale", "body": "20% off today"}
    form = parse_qs(next(b for p, b in bodies.items() if p.endswith("Messages.json")))
    callback = urlsplit(form["StatusCallback"][0])
    assert callback.path == "/webhooks/twilio/status" and parse_qs(callback.query)["mid"] == ["m-sms"]


def test_twilio_messaging_service_and_region_edge_env_still_reach_the_base_url(sandbox, channel_env, monkeypatch):
    monkeypatch.setenv("TWILIO_REGION", "au1")
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    env = {k: v for k, v in channel_env.items() if k != "MEMBERCARE_TWILIO_FROM"}
    env["MEMBERCARE_TWILIO_MESSAGING_SERVICE_SID"] = "MG" + "1" * 32
    sms = TwilioSmsChannel(TwilioConfig.from_env(env))
    try:
        assert isinstance(sms.send(message(Channel.SMS, MOBILE)), Accepted)
    finally:
        sms.close()
    assert sandbox.stats()["accepted"] == {"sms": 1}


# ------------------------------------------------------------------------------- permanent


@pytest.mark.parametrize("to", ["not-an-address", "mei@", "@example.com"])
def test_sendgrid_invalid_recipient(sandbox, adapters, to):
    result = adapters[Channel.EMAIL].send(message(Channel.EMAIL, to))
    assert isinstance(result, PermanentFailure) and result.reason is FailureReason.INVALID_RECIPIENT
    assert result.fallback and result.status == 400


@pytest.mark.parametrize("to", ["+88691234", "0912345678", "+1555"])
def test_twilio_invalid_number_is_21211(sandbox, adapters, to):
    result = adapters[Channel.SMS].send(message(Channel.SMS, to))
    assert isinstance(result, PermanentFailure)
    assert (result.reason, result.provider_code, result.fallback) == (FailureReason.INVALID_RECIPIENT, "21211", True)


def test_twilio_landline_is_21614(sandbox, adapters):
    result = adapters[Channel.SMS].send(message(Channel.SMS, LANDLINE))
    assert isinstance(result, PermanentFailure) and result.provider_code == "21614"
    assert result.reason is FailureReason.INVALID_RECIPIENT


def test_twilio_stop_is_opted_out_without_fallback(sandbox, adapters):
    sandbox.configure(twilio_opted_out=[MOBILE])
    result = adapters[Channel.SMS].send(message(Channel.SMS, MOBILE))
    assert isinstance(result, PermanentFailure)
    assert (result.reason, result.fallback, result.provider_code) == (FailureReason.OPTED_OUT, False, "21610")
    assert sandbox.stats()["accepted"] == {}


def test_fcm_unregistered_token_falls_back(sandbox, adapters):
    sandbox.configure(fcm_unregistered_tokens=["dead-token-0001"])
    for token in ("dead-token-0001", "stale-token-0002"):
        result = adapters[Channel.PUSH].send(message(Channel.PUSH, token))
        assert isinstance(result, PermanentFailure)
        assert (result.reason, result.fallback) == (FailureReason.UNREGISTERED_TOKEN, True)


def test_fcm_invalid_argument_is_rejected(sandbox, adapters):
    result = adapters[Channel.PUSH].send(replace(message(Channel.PUSH, "device-token-0001"),
                                                 content=PushContent("t", "b", {"google.bad": "x"})))
    assert isinstance(result, PermanentFailure) and result.reason is FailureReason.REJECTED


# ------------------------------------------------------------------------------- transient


@pytest.mark.parametrize("channel,to", [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE),
                                        (Channel.PUSH, "device-token-0001")])
def test_rate_limit_is_throttled_with_retry_after(sandbox, adapters, channel, to):
    sandbox.configure(**{channel.value: {"rate_limit": 0.5, "burst": 1}})  # one now, the next in 2 s
    first = adapters[channel].send(message(channel, to, "m-1"))
    second = adapters[channel].send(message(channel, to, "m-2"))
    assert isinstance(first, Accepted)
    assert isinstance(second, TransientFailure) and second.throttled and second.status == 429
    assert second.retry_after == 2.0
    assert sandbox.stats()["throttled"] == {channel.value: 1}


@pytest.mark.parametrize("channel,to", [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE),
                                        (Channel.PUSH, "device-token-0001")])
def test_server_errors_are_transient_and_never_recorded(sandbox, adapters, channel, to):
    sandbox.configure(**{channel.value: {"error_rate": 1.0}})
    result = adapters[channel].send(message(channel, to))
    assert isinstance(result, TransientFailure) and not result.throttled and result.status in (500, 503)
    assert sandbox.stats()["accepted"] == {} and sandbox.stats()["faults"][channel.value] == {"error": 1}


@pytest.mark.parametrize("channel,to", [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE),
                                        (Channel.PUSH, "device-token-0001")])
def test_timeouts_and_dropped_connections_are_transient(sandbox, adapters, channel, to):
    adapter = fast(adapters[channel])
    try:
        sandbox.configure(**{channel.value: {"timeout_rate": 1.0}})
        result = adapter.send(message(channel, to, "m-timeout"))
        assert isinstance(result, TransientFailure), result
        assert re.search(r"time|deadline", result.reason, flags=re.IGNORECASE), result
        sandbox.configure(**{channel.value: {"timeout_rate": 0.0, "drop_rate": 1.0}})
        result = adapter.send(message(channel, to, "m-drop"))
        assert isinstance(result, TransientFailure), result
    finally:
        adapter.close()
    assert sandbox.stats()["accepted"] == {}


def test_ghost_faults_are_recorded_but_look_transient_to_the_sender(sandbox, adapters):
    sandbox.configure(email={"ghost_rate": 1.0})
    result = adapters[Channel.EMAIL].send(message(Channel.EMAIL, "mei@example.com"))
    assert isinstance(result, TransientFailure)
    (record,) = sandbox.messages()
    assert record["ghost"] is True


def test_unreachable_provider_is_transient(channel_env):
    env = dict(channel_env, MEMBERCARE_SENDGRID_BASE_URL="http://127.0.0.1:9",
               MEMBERCARE_TWILIO_BASE_URL="http://127.0.0.1:9")
    built = build_channels(env, channels=[Channel.EMAIL, Channel.SMS])
    try:
        assert isinstance(built[Channel.EMAIL].send(message(Channel.EMAIL, "mei@example.com")), TransientFailure)
        assert isinstance(built[Channel.SMS].send(message(Channel.SMS, MOBILE)), TransientFailure)
    finally:
        close_channels(built)


# --------------------------------------------------------------------------- configuration


def test_bad_credentials_raise_configuration_error_for_every_channel(sandbox, channel_env, tmp_path):
    email = SendGridEmailChannel(replace(SendGridConfig.from_env(channel_env), api_key="SG.wrong"))
    with pytest.raises(ConfigurationError, match="MEMBERCARE_SENDGRID_API_KEY"):
        email.send(message(Channel.EMAIL, "mei@example.com"))
    sms = TwilioSmsChannel(replace(TwilioConfig.from_env(channel_env), auth_token="wrong"))
    try:
        with pytest.raises(ConfigurationError, match="MEMBERCARE_TWILIO_AUTH_TOKEN"):
            sms.send(message(Channel.SMS, MOBILE))
    finally:
        sms.close()
    # A service account the sandbox does not know: the token endpoint refuses the signed JWT.
    path, _ = make_service_account(tmp_path, sandbox.token_uri)
    push = FirebasePushChannel(FirebaseConfig(credentials_path=path, base_url=sandbox.url))
    try:
        with pytest.raises(ConfigurationError, match="MEMBERCARE_FIREBASE_CREDENTIALS"):
            push.send(message(Channel.PUSH, "device-token-0001"))
    finally:
        push.close()
    assert sandbox.stats()["accepted"] == {}


def test_fcm_url_override_does_not_leak_to_other_firebase_apps(adapters):
    from firebase_admin import messaging

    assert messaging._MessagingService.FCM_URL.startswith("https://fcm.googleapis.com/")


# ---------------------------------------------------------------------------- concurrency


def test_adapters_are_thread_safe_under_a_worker_pool(sandbox, adapters):
    jobs = [(ch, to, f"m-{ch}-{i}") for i in range(60)
            for ch, to in [(Channel.EMAIL, f"member{i}@example.com"), (Channel.SMS, MOBILE),
                           (Channel.PUSH, f"device-token-{i:04d}")]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda j: adapters[j[0]].send(message(*j)), jobs))
    assert all(isinstance(r, Accepted) for r in results), [r for r in results if not isinstance(r, Accepted)][:3]
    stats = sandbox.stats()
    assert stats["accepted"] == {"email": 60, "sms": 60, "push": 60}
    assert stats["duplicates_by_message_id_total"] == 0
    assert len({r.provider_message_id for r in results}) == 180
    assert threading.active_count() < 100


# ---------------------------------------------------------------------- keep-alive transports


def _transport(adapter):
    """The KeepAliveTransport under each adapter (SendGrid's own, Twilio's http client, FCM's session adapter)."""
    if isinstance(adapter, SendGridEmailChannel):
        return adapter._transport
    if isinstance(adapter, TwilioSmsChannel):
        return adapter._http.transport
    return adapter._service._client.session.get_adapter(adapter._service._fcm_url).transport


@pytest.mark.parametrize("channel,to", [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE),
                                        (Channel.PUSH, "device-token-0001")])
def test_sequential_sends_reuse_one_kept_alive_connection(sandbox, adapters, channel, to):
    # No simulated STOP replies or uninstalls: every send must be accepted.
    sandbox.configure(engagement={ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")})
    adapter = type(adapters[channel])(adapters[channel].config)  # a fresh pool
    try:
        results = [adapter.send(message(channel, to, f"m-{i}")) for i in range(12)]
        assert all(isinstance(r, Accepted) for r in results), results
        assert _transport(adapter).connections_opened() == 1
    finally:
        adapter.close()


@pytest.mark.parametrize("channel,to", [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE),
                                        (Channel.PUSH, "device-token-0001")])
def test_keep_alive_transport_failures_keep_their_ambiguity(sandbox, adapters, channel, to, channel_env):
    # Answer lost after the request was written (held past the timeout, connection dropped): ambiguous.
    sandbox.configure(engagement={ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")})
    adapter = fast(adapters[channel])
    try:
        adapter.send(message(channel, to, "m-warm"))  # a pooled connection exists: the faults hit a reused one
        sandbox.configure(**{channel.value: {"timeout_rate": 1.0}})
        held = adapter.send(message(channel, to, "m-timeout"))
        sandbox.configure(**{channel.value: {"timeout_rate": 0.0, "drop_rate": 1.0}})
        dropped = adapter.send(message(channel, to, "m-drop"))
        sandbox.configure(**{channel.value: {"drop_rate": 0.0}})
        after = adapter.send(message(channel, to, "m-after"))  # the pool recovers from broken connections
    finally:
        adapter.close()
    for result in (held, dropped):
        assert isinstance(result, TransientFailure) and result.ambiguous, result
    assert isinstance(after, Accepted), after
    # Nothing could be sent (connection refused): transient and not ambiguous.
    refused = dict(channel_env, MEMBERCARE_SENDGRID_BASE_URL="http://127.0.0.1:9",
                   MEMBERCARE_TWILIO_BASE_URL="http://127.0.0.1:9", MEMBERCARE_FCM_BASE_URL="http://127.0.0.1:9")
    built = build_channels(refused, channels=[channel])
    try:
        result = built[channel].send(message(channel, to, "m-refused"))
    finally:
        close_channels(built)
    assert isinstance(result, TransientFailure) and not result.ambiguous, result


def test_urllib3_errors_map_to_the_same_ambiguity_as_requests_errors():
    from urllib3 import exceptions as ux

    from channels.base import urllib3_failure

    assert not urllib3_failure(ux.ConnectTimeoutError(None, "connect timed out")).ambiguous
    assert not urllib3_failure(ux.NewConnectionError(None, "refused")).ambiguous
    assert urllib3_failure(ux.ReadTimeoutError(None, "/", "read timed out")).ambiguous
    lost = urllib3_failure(ux.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
    assert lost.ambiguous and "ConnectionResetError" in lost.reason
