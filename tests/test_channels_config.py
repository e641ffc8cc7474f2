"""Adapter configuration: explicit dataclasses from the environment, errors that name the variable, no secrets
in reprs or logs, Retry-After parsing, the registry."""

from __future__ import annotations

import logging
from email.utils import formatdate

import pytest

from channels.base import ConfigurationError, parse_retry_after
from channels.fcm.adapter import FirebaseConfig
from channels.registry import build_channels
from channels.sendgrid.adapter import SendGridConfig
from channels.twilio.adapter import TwilioConfig
from membercare.models import Channel
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import SENDGRID_KEY, TWILIO_TOKEN
from test_channels_sandbox import MOBILE, message


@pytest.mark.parametrize("missing", ["MEMBERCARE_SENDGRID_API_KEY", "MEMBERCARE_SENDGRID_FROM"])
def test_sendgrid_missing_variable_is_named(channel_env, missing):
    env = {k: v for k, v in channel_env.items() if k != missing}
    with pytest.raises(ConfigurationError, match=missing):
        SendGridConfig.from_env(env)


@pytest.mark.parametrize("missing", ["MEMBERCARE_TWILIO_ACCOUNT_SID", "MEMBERCARE_TWILIO_AUTH_TOKEN",
                                     "MEMBERCARE_TWILIO_FROM"])
def test_twilio_missing_variable_is_named(channel_env, missing):
    env = {k: v for k, v in channel_env.items() if k != missing}
    with pytest.raises(ConfigurationError, match=missing):
        TwilioConfig.from_env(env)


def test_firebase_credentials_problems_are_named(tmp_path):
    with pytest.raises(ConfigurationError, match="MEMBERCARE_FIREBASE_CREDENTIALS"):
        FirebaseConfig.from_env({})
    with pytest.raises(ConfigurationError, match="no such file"):
        FirebaseConfig.from_env({"MEMBERCARE_FIREBASE_CREDENTIALS": str(tmp_path / "nope.json")})
    (tmp_path / "user.json").write_text('{"type": "authorized_user"}')
    with pytest.raises(ConfigurationError, match="not a service-account key"):
        FirebaseConfig.from_env({"MEMBERCARE_FIREBASE_CREDENTIALS": str(tmp_path / "user.json")})


def test_base_urls_are_checked_and_unset_means_the_real_provider(channel_env):
    with pytest.raises(ConfigurationError, match="MEMBERCARE_SENDGRID_BASE_URL"):
        SendGridConfig.from_env(dict(channel_env, MEMBERCARE_SENDGRID_BASE_URL="localhost:8025"))
    env = {k: v for k, v in channel_env.items() if not k.endswith("_BASE_URL")}
    assert SendGridConfig.from_env(env).base_url is None and TwilioConfig.from_env(env).base_url is None


def test_sender_name_is_parsed_and_reprs_hide_secrets(channel_env):
    sg, tw, fb = (SendGridConfig.from_env(channel_env), TwilioConfig.from_env(channel_env),
                  FirebaseConfig.from_env(channel_env))
    assert (sg.from_name, sg.from_email) == ("Sandbox Shop", "shop@example.com")
    text = repr(sg) + repr(tw) + repr(fb)
    assert SENDGRID_KEY not in text and TWILIO_TOKEN not in text and "PRIVATE KEY" not in text


def test_registry_builds_only_configured_channels_and_names_partial_ones(channel_env):
    email_only = {k: v for k, v in channel_env.items() if "SENDGRID" in k}
    built = build_channels(email_only)
    assert set(built) == {Channel.EMAIL}
    with pytest.raises(ConfigurationError, match="MEMBERCARE_TWILIO_AUTH_TOKEN"):
        build_channels(dict(email_only, MEMBERCARE_TWILIO_ACCOUNT_SID="AC1"))
    with pytest.raises(ConfigurationError, match="MEMBERCARE_FIREBASE_CREDENTIALS"):
        build_channels(email_only, channels=["email", "push"])
    assert build_channels({}) == {}


def test_no_secret_or_address_reaches_the_logs_even_at_debug(adapters, caplog):
    caplog.set_level(logging.DEBUG)
    adapters[Channel.EMAIL].send(message(Channel.EMAIL, "secret.member@example.com"))
    adapters[Channel.SMS].send(message(Channel.SMS, MOBILE))
    adapters[Channel.SMS].send(message(Channel.SMS, "+88691234"))  # a failure is logged, redacted
    adapters[Channel.PUSH].send(message(Channel.PUSH, "stale-device-token-123456"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (SENDGRID_KEY, TWILIO_TOKEN, "secret.member@example.com", MOBILE, "stale-device-token-123456"):
        assert secret not in text


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("") is None
    now = 1_800_000_000
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
