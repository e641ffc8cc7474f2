"""The adapters' async transport (``send_async``: the SDKs build each request, aiohttp sends it on the
dispatcher's event loop) against the in-process sandbox: every outcome maps exactly as the blocking path's."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest

from channels.base import (
    Accepted,
    ConfigurationError,
    FailureReason,
    PermanentFailure,
    PushContent,
    TransientFailure,
)
from channels.fcm.adapter import FirebaseConfig, FirebasePushChannel
from channels.registry import build_channels, close_channels
from channels.sendgrid.adapter import SendGridConfig, SendGridEmailChannel
from channels.twilio.adapter import TwilioConfig, TwilioSmsChannel
from membercare.delivery.send_loop import send_loop
from membercare.models import Channel
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import make_service_account
from test_channels_sandbox import LANDLINE, MOBILE, fast, message

CHANNELS = [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, MOBILE), (Channel.PUSH, "device-token-0001")]
QUIET = {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")}


def run(adapter, msg):
    """``adapter.send_async(msg)`` on the process's send loop, as the dispatcher runs it."""
    return asyncio.run_coroutine_threadsafe(adapter.send_async(msg), send_loop()).result(timeout=30)


def shape(result):
    """What the delivery engine reads of a result (transport failures word their reason per library)."""
    if isinstance(result, Accepted):
        return ("accepted", result.status, bool(result.provider_message_id))
    if isinstance(result, PermanentFailure):
        return ("permanent", result.reason, result.fallback, result.status, result.provider_code)
    return ("transient", result.throttled, result.status, result.ambiguous, result.retry_after)


@pytest.mark.parametrize("channel,to", CHANNELS)
def test_accepted_with_the_same_request_as_the_blocking_path(sandbox, adapters, channel, to):
    sandbox.configure(capture_requests=10, engagement=QUIET)
    sync = adapters[channel].send(message(channel, to, "m-sync"))
    result = run(adapters[channel], message(channel, to, "m-async"))
    assert isinstance(result, Accepted) and result.provider_message_id, result
    assert shape(result) == shape(sync)
    records = {r["message_id"]: r for r in sandbox.messages()}
    assert records["m-async"]["idempotency_key"] == "c1:o1:m-async"
    assert records["m-async"]["provider_id"] == result.provider_message_id
    captured = sandbox.captured()
    assert len(captured) == 2
    first, second = (c["body"] for c in captured)
    if channel is Channel.EMAIL:
        assert json.loads(second) == json.loads(first.replace("m-sync", "m-async"))
    elif channel is Channel.SMS:
        form = parse_qs(second)
        assert form == parse_qs(first.replace("m-sync", "m-async"))
        assert parse_qs(urlsplit(form["StatusCallback"][0]).query)["mid"] == ["m-async"]
    else:
        assert json.loads(second) == json.loads(first.replace("m-sync", "m-async"))
        assert json.loads(second)["message"]["token"] == to


@pytest.mark.parametrize("channel,to,setup", [
    (Channel.EMAIL, "not-an-address", {}),
    (Channel.SMS, "+88691234", {}),
    (Channel.SMS, LANDLINE, {}),
    (Channel.SMS, MOBILE, {"twilio_opted_out": [MOBILE]}),
    (Channel.PUSH, "dead-token-0001", {"fcm_unregistered_tokens": ["dead-token-0001"]}),
])
def test_permanent_refusals_map_as_on_the_blocking_path(sandbox, adapters, channel, to, setup):
    sandbox.configure(**setup)
    sync = adapters[channel].send(message(channel, to, "m-sync"))
    result = run(adapters[channel], message(channel, to, "m-async"))
    assert isinstance(result, PermanentFailure), result
    assert shape(result) == shape(sync)


def test_fcm_invalid_argument_is_rejected(sandbox, adapters):
    msg = replace(message(Channel.PUSH, "device-token-0001"), content=PushContent("t", "b", {"google.bad": "x"}))
    result = run(adapters[Channel.PUSH], msg)
    assert isinstance(result, PermanentFailure) and result.reason is FailureReason.REJECTED
    assert shape(result) == shape(adapters[Channel.PUSH].send(msg))


@pytest.mark.parametrize("channel,to", CHANNELS)
def test_429_is_throttled_with_retry_after(sandbox, adapters, channel, to):
    sandbox.configure(**{channel.value: {"rate_limit": 0.5, "burst": 1}})  # one now, the next in 2 s
    first = run(adapters[channel], message(channel, to, "m-1"))
    second = run(adapters[channel], message(channel, to, "m-2"))
    assert isinstance(first, Accepted), first
    assert isinstance(second, TransientFailure) and second.throttled and second.status == 429, second
    assert second.retry_after == 2.0 and not second.ambiguous
    assert sandbox.stats()["throttled"] == {channel.value: 1}


@pytest.mark.parametrize("channel,to", CHANNELS)
def test_5xx_is_transient_not_ambiguous_and_never_recorded(sandbox, adapters, channel, to):
    sandbox.configure(**{channel.value: {"error_rate": 1.0}})
    result = run(adapters[channel], message(channel, to))
    assert isinstance(result, TransientFailure) and not result.throttled, result
    assert result.status in (500, 503) and not result.ambiguous
    sync = adapters[channel].send(message(channel, to, "m-sync"))  # the sandbox draws 500 or 503
    assert isinstance(sync, TransientFailure) and (sync.throttled, sync.ambiguous) == (False, False)
    assert sandbox.stats()["accepted"] == {}


@pytest.mark.parametrize("channel,to", CHANNELS)
def test_lost_answers_are_ambiguous_and_the_pool_recovers(sandbox, adapters, channel, to):
    """A held answer (read timeout), a connection dropped after the request was written, and a ghost (the
    provider accepted, then dropped the connection) are all ``ambiguous``: the dispatcher makes them
    ``unknown``, never ``failed``. The faults hit a kept-alive connection, as in a real run."""
    sandbox.configure(engagement=QUIET)
    adapter = fast(adapters[channel])
    try:
        assert isinstance(run(adapter, message(channel, to, "m-warm")), Accepted)
        sandbox.configure(**{channel.value: {"timeout_rate": 1.0}})
        held = run(adapter, message(channel, to, "m-timeout"))
        sandbox.configure(**{channel.value: {"timeout_rate": 0.0, "drop_rate": 1.0}})
        dropped = run(adapter, message(channel, to, "m-drop"))
        sandbox.configure(**{channel.value: {"drop_rate": 0.0, "ghost_rate": 1.0}})
        ghost = run(adapter, message(channel, to, "m-ghost"))
        sandbox.configure(**{channel.value: {"ghost_rate": 0.0}})
        after = run(adapter, message(channel, to, "m-after"))
    finally:
        adapter.close()
    assert isinstance(held, TransientFailure) and held.ambiguous and "timeout" in held.reason, held
    for result in (dropped, ghost):
        assert isinstance(result, TransientFailure) and result.ambiguous and "after sending" in result.reason, result
    assert isinstance(after, Accepted), after
    assert [r["message_id"] for r in sandbox.messages() if r.get("ghost")] == ["m-ghost"]


@pytest.mark.parametrize("channel,to", CHANNELS)
def test_refused_connection_is_transient_and_not_ambiguous(channel_env, channel, to):
    refused = dict(channel_env, MEMBERCARE_SENDGRID_BASE_URL="http://127.0.0.1:9",
                   MEMBERCARE_TWILIO_BASE_URL="http://127.0.0.1:9", MEMBERCARE_FCM_BASE_URL="http://127.0.0.1:9")
    built = build_channels(refused, channels=[channel])
    try:
        result = run(built[channel], message(channel, to, "m-refused"))
    finally:
        close_channels(built)
    assert isinstance(result, TransientFailure) and not result.ambiguous, result
    assert "before sending" in result.reason


def test_bad_credentials_raise_configuration_error(sandbox, channel_env, tmp_path):
    email = SendGridEmailChannel(replace(SendGridConfig.from_env(channel_env), api_key="SG.wrong"))
    sms = TwilioSmsChannel(replace(TwilioConfig.from_env(channel_env), auth_token="wrong"))
    path, _ = make_service_account(tmp_path, sandbox.token_uri)  # unknown to the sandbox's token endpoint
    push = FirebasePushChannel(FirebaseConfig(credentials_path=path, base_url=sandbox.url))
    try:
        with pytest.raises(ConfigurationError, match="MEMBERCARE_SENDGRID_API_KEY"):
            run(email, message(Channel.EMAIL, "mei@example.com"))
        with pytest.raises(ConfigurationError, match="MEMBERCARE_TWILIO_AUTH_TOKEN"):
            run(sms, message(Channel.SMS, MOBILE))
        with pytest.raises(ConfigurationError, match="MEMBERCARE_FIREBASE_CREDENTIALS"):
            run(push, message(Channel.PUSH, "device-token-0001"))
    finally:
        for adapter in (email, sms, push):
            adapter.close()
    assert sandbox.stats()["accepted"] == {}


@pytest.mark.parametrize("channel,to", CHANNELS)
def test_concurrent_sends_share_a_few_kept_alive_connections(sandbox, adapters, channel, to):
    sandbox.configure(engagement=QUIET)
    adapter = type(adapters[channel])(adapters[channel].config)  # fresh pools
    try:
        async def burst():
            return await asyncio.gather(*(adapter.send_async(message(channel, to, f"m-{i}")) for i in range(40)))

        results = asyncio.run_coroutine_threadsafe(burst(), send_loop()).result(timeout=60)
        results += [run(adapter, message(channel, to, f"m-seq-{i}")) for i in range(5)]
        transport = adapter._aio_http.transport if channel is Channel.SMS else adapter._aio
        opened = transport.connections_opened()
    finally:
        adapter.close()
    assert all(isinstance(r, Accepted) for r in results), [r for r in results if not isinstance(r, Accepted)][:3]
    assert len({r.provider_message_id for r in results}) == 45
    assert 1 <= opened <= 40
    assert sandbox.stats()["duplicates_by_message_id_total"] == 0
