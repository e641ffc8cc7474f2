"""Providers are plug-ins: the registry maps names to them, each channel's provider is chosen by name, and
the receiver mounts every registered provider's webhooks.

The "relay" provider below is what a new provider adds (its own classes plus one registry entry): the tests
register it and check that sending, webhook routing, authentication, storage and the start-up report pick
it up without any other change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from channels import registry
from channels.base import (
    Accepted,
    OutboundMessage,
    Provider,
    ProviderBase,
    SendResult,
    Webhook,
    WebhookBatch,
    WebhookRejected,
    WebhookRequest,
    require,
)
from channels.registry import PROVIDERS, build_channels, get_provider, provider_for
from membercare.engagement.events import EngagementEvent, EventKind, MalformedPayload, loads_json
from membercare.engagement.models import EngagementEventRow
from membercare.errors import ConfigurationError
from membercare.models import Channel
from membercare.receiver import ReceiverConfig, create_app

SECRET = "relay-webhook-secret"


@dataclass(frozen=True)
class RelayConfig:
    api_key: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RelayConfig:
        return cls(api_key=require(env, "MEMBERCARE_RELAY_API_KEY"))


class RelaySms:
    channel = Channel.SMS

    def __init__(self, config: RelayConfig):
        self.config, self.closed = config, False

    def send(self, message: OutboundMessage) -> SendResult:
        return Accepted(provider_message_id=f"relay-{message.message_id}")

    def close(self) -> None:
        self.closed = True


class RelayStatusWebhook(Webhook):
    """JSON array of ``{"id", "message_id", "status"}``, signed ``X-Relay-Signature: <hex HMAC-SHA256>``."""

    path = "/webhooks/relay"
    label = "relay"
    secret_missing = "relay webhook secret is not configured"
    body_limit = 8 * 1024

    def check_headers(self, headers):
        if not headers.get("X-Relay-Signature"):
            raise WebhookRejected(401, "missing X-Relay-Signature")

    def validate_request(self, request: WebhookRequest) -> None:
        expected = hmac.new(request.secret.encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Relay-Signature", "")):
            raise WebhookRejected(403, "invalid signature")

    def parse_events(self, request: WebhookRequest) -> WebhookBatch:
        try:
            items = loads_json(request.body)
        except MalformedPayload as exc:
            raise WebhookRejected(400, str(exc)) from None
        if not isinstance(items, list):
            raise WebhookRejected(400, "a JSON array of statuses")
        return WebhookBatch([EngagementEvent(provider="relay", dedupe_key=item["id"], kind=EventKind.DELIVERED,
                                             channel=Channel.SMS, occurred_at=request.now, raw=item,
                                             message_id=item.get("message_id")) for item in items])


class RelayProvider(ProviderBase):
    name = "relay"
    channel = Channel.SMS
    primary_env = "MEMBERCARE_RELAY_API_KEY"
    config_type = RelayConfig
    adapter_type = RelaySms
    webhook_secret_env = "MEMBERCARE_RELAY_WEBHOOK_SECRET"
    webhook_types = (RelayStatusWebhook,)


@pytest.fixture
def relay(monkeypatch):
    provider = RelayProvider()
    monkeypatch.setitem(PROVIDERS, provider.name, provider)
    return provider


def test_the_shipped_providers_are_registered_by_name_and_satisfy_the_protocol():
    assert list(PROVIDERS) == ["sendgrid", "twilio", "fcm", "line"]
    assert {name: p.channel for name, p in PROVIDERS.items()} == {
        "sendgrid": Channel.EMAIL, "twilio": Channel.SMS, "fcm": Channel.PUSH, "line": Channel.LINE}
    for provider in PROVIDERS.values():
        assert isinstance(provider, Provider)
        assert provider.webhooks(), f"{provider.name} serves no webhook"
    paths = [w.path for p in PROVIDERS.values() for w in p.webhooks()]
    assert paths == ["/webhooks/sendgrid", "/webhooks/twilio/status", "/webhooks/twilio/inbound", "/track/push",
                     "/webhooks/line"]


def test_each_channel_defaults_to_its_first_registered_provider(relay):
    assert provider_for(Channel.SMS, {}) is PROVIDERS["twilio"]
    assert provider_for("email", {}) is PROVIDERS["sendgrid"]
    assert provider_for(Channel.SMS, {"MEMBERCARE_PROVIDER_SMS": "relay"}) is relay
    assert provider_for(Channel.SMS, {"MEMBERCARE_PROVIDER_SMS": " Twilio "}) is PROVIDERS["twilio"]


def test_a_provider_name_that_is_unknown_or_of_another_channel_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match=r"unknown provider 'nope'; registered: fcm, line, sendgrid, twilio"):
        provider_for(Channel.SMS, {"MEMBERCARE_PROVIDER_SMS": "nope"})
    with pytest.raises(ConfigurationError, match="MEMBERCARE_PROVIDER_SMS=sendgrid: sendgrid sends email, not sms"):
        provider_for(Channel.SMS, {"MEMBERCARE_PROVIDER_SMS": "sendgrid"})
    with pytest.raises(ConfigurationError, match="unknown provider"):
        get_provider("viber")


def test_build_channels_builds_the_provider_chosen_by_name(relay):
    env = {"MEMBERCARE_PROVIDER_SMS": "relay", "MEMBERCARE_RELAY_API_KEY": "k"}
    adapters = build_channels(env)
    assert list(adapters) == [Channel.SMS] and isinstance(adapters[Channel.SMS], RelaySms)
    registry.close_channels(adapters)
    assert adapters[Channel.SMS].closed
    # Its primary variable missing: the channel is not configured (Twilio's variables do not count for it).
    assert build_channels({"MEMBERCARE_PROVIDER_SMS": "relay", "MEMBERCARE_TWILIO_ACCOUNT_SID": "AC1"}) == {}
    with pytest.raises(ConfigurationError, match="MEMBERCARE_RELAY_API_KEY is not set"):
        build_channels({"MEMBERCARE_PROVIDER_SMS": "relay"}, channels=["sms"])
    # A config object finds its provider by type.
    assert isinstance(registry.adapter_for(RelayConfig("k")), RelaySms)


def test_the_receiver_mounts_a_registered_providers_webhook(relay, engine):
    def post(client, body: bytes, signature: str | None):
        headers = {"X-Relay-Signature": signature} if signature is not None else {}
        return client.post("/webhooks/relay", content=body, headers=headers)

    body = json.dumps([{"id": "r1", "message_id": "m1", "status": "delivered"},
                       {"id": "r2", "message_id": "m2", "status": "delivered"}]).encode()
    good = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()

    unconfigured = TestClient(create_app(ReceiverConfig(), engine))
    assert post(unconfigured, body, good).status_code == 503
    assert "/webhooks/relay (MEMBERCARE_RELAY_WEBHOOK_SECRET)" in ReceiverConfig().disabled_endpoints()

    config = ReceiverConfig.from_env({"MEMBERCARE_RELAY_WEBHOOK_SECRET": SECRET})
    assert config.webhook_secret("relay") == SECRET
    assert not any(e.startswith("/webhooks/relay") for e in config.disabled_endpoints())
    client = TestClient(create_app(config, engine))
    assert post(client, body, None).status_code == 401
    assert post(client, body, "00" * 32).status_code == 403
    assert post(client, b"{}", hmac.new(SECRET.encode(), b"{}", hashlib.sha256).hexdigest()).status_code == 400
    # Its declared body limit applies before authentication.
    assert post(client, b"[" + b" " * 9000 + b"]", good).status_code == 413
    first = post(client, body, good)
    assert first.status_code == 200
    assert first.json() == {"received": 2, "stored": 2, "duplicates": 0}
    assert post(client, body, good).json() == {"received": 2, "stored": 0, "duplicates": 2}
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        stored = conn.execute(sa.select(t.c.provider, t.c.provider_event_id).order_by(t.c.id)).all()
    assert [tuple(r) for r in stored] == [("relay", "r1"), ("relay", "r2")]


def test_webhook_secrets_name_registered_providers_only(relay):
    assert ReceiverConfig(webhook_secrets=(("relay", "s"),)).webhook_secret("relay") == "s"
    with pytest.raises(ConfigurationError, match="unknown provider 'viber'"):
        ReceiverConfig(webhook_secrets=(("viber", "s"),))
    with pytest.raises(ConfigurationError, match="sendgrid_public_key"):
        ReceiverConfig(webhook_secrets=(("sendgrid", "s"),))
    # The shipped providers' secrets keep their named fields; from_env fills them from each provider's variable.
    config = ReceiverConfig.from_env({"MEMBERCARE_TWILIO_AUTH_TOKEN": "tok", "MEMBERCARE_PUSH_TRACKING_SECRET": "p"})
    assert (config.twilio_auth_token, config.push_tracking_secret) == ("tok", "p")
    assert config.webhook_secret("twilio") == "tok" and config.webhook_secret("sendgrid") is None


def test_reconciliation_asks_twilio_and_sendgrid_only_about_their_own_channels(relay, engine):
    from membercare.delivery.provider_records import (
        SendGridEventRecords,
        TwilioListRecords,
        provider_records_from_env,
    )

    env = {"MEMBERCARE_PROVIDER_SMS": "relay", "MEMBERCARE_RELAY_API_KEY": "k",
           "MEMBERCARE_TWILIO_ACCOUNT_SID": "AC1", "MEMBERCARE_TWILIO_AUTH_TOKEN": "t",
           "MEMBERCARE_TWILIO_FROM": "+15005550006", "MEMBERCARE_SENDGRID_API_KEY": "SG.x"}
    records = provider_records_from_env(engine, env)
    assert records is not None and [type(s) for s in records.sources] == [SendGridEventRecords]
    records.close()
    records = provider_records_from_env(engine, {k: v for k, v in env.items() if k != "MEMBERCARE_PROVIDER_SMS"})
    assert records is not None and [type(s) for s in records.sources] == [TwilioListRecords, SendGridEventRecords]
    records.close()


def test_a_channel_whose_provider_is_not_set_up_at_all_is_reported_unconfigured():
    from channels.registry import unconfigured_channels

    env = {"MEMBERCARE_SENDGRID_API_KEY": "SG.x", "MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN": "  "}
    assert unconfigured_channels(["email", "line", "sms"], env) == [Channel.LINE, Channel.SMS]
    assert unconfigured_channels(["email"], env) == []
