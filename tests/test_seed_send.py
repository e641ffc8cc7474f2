"""Test sends to a seed list: every channel x locale x variant through the real SDKs against the sandbox,
marked as tests, and never in the ledger."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from clirun import run_cli
from fakes import FakeAdapter, seed_members
from membercare.campaigns.seed_send import TEST_CATEGORY, parse_seeds, send_test
from membercare.config import Settings
from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.errors import InputError
from membercare.models import Channel, Coupon
from sandbox_fixtures import *  # noqa: F403 - the sandbox fixtures

NOW = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)
SEEDS = "qa@example.com, +886912345678, push:seed-device-token-1"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def test_seed_lists_are_parsed_by_kind_without_echoing_bad_entries(tmp_path):
    seeds = parse_seeds(SEEDS)
    assert [s.channel for s in seeds] == [Channel.EMAIL, Channel.SMS, Channel.PUSH]
    f = tmp_path / "seeds.txt"
    f.write_text("# the marketing team\nmei@example.com\n+886 912 345 679\n", encoding="utf-8")
    assert [s.to for s in parse_seeds([f"@{f}"])] == ["mei@example.com", "+886912345679"]
    with pytest.raises(InputError) as err:
        parse_seeds("someone@example,com")
    assert "someone" not in str(err.value)
    with pytest.raises(InputError, match="empty"):
        parse_seeds(" , ")


def _ledger(engine):
    with engine.connect() as conn:
        return [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (OutboxMessage.__table__, CampaignRun.__table__, Coupon.__table__)]


def test_every_channel_locale_and_variant_reaches_the_seeds_marked_as_a_test(sandbox, adapters, settings, engine):
    # The seeds' simulated handsets never reply STOP here: a STOP to the first SMS would make Twilio refuse the
    # next ones (21610), as it should, and the test is about what is sent, not about recipients.
    quiet = {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")}
    sandbox.configure(capture_requests=50, engagement=quiet)
    before = _ledger(engine)
    sent = send_test(settings, "churn_winback", parse_seeds(SEEDS), adapters)
    # churn_winback: 3 channels x 2 locales (zh-TW, en) x 2 variants (a, b), one seed per channel.
    assert len(sent) == 12 and all(s.outcome == "accepted" for s in sent), [s for s in sent if s.outcome != "accepted"]
    assert {(s.channel, s.locale, s.variant) for s in sent} == {
        (c, loc, v) for c in ("email", "sms", "push") for loc in ("zh-TW", "en") for v in ("a", "b")}
    assert all(s.headline.startswith("[TEST]") for s in sent)
    records = sandbox.messages()
    assert len(records) == 12 and all(r["message_id"].startswith("test") for r in records)
    bodies = [c["body"] for c in sandbox.captured()]
    assert sum(TEST_CATEGORY in b for b in bodies) >= 4  # the email requests carry the test category
    assert sum("[TEST]" in b or "%5BTEST%5D" in b or "[TEST]" in json.dumps(b) for b in bodies) == 12
    assert _ledger(engine) == before  # no outbox row, run or coupon: caps, reports and optimisation never see it


def test_a_real_member_can_be_the_sample_and_only_seeded_channels_are_sent(sandbox, adapters, settings, engine):
    with engine.begin() as conn:
        mid = seed_members(conn, 1, now=NOW - timedelta(days=30))[0]
    sent = send_test(settings, "vip_appreciation", parse_seeds("qa@example.com"), adapters, engine=engine,
                     member_id=mid, now=NOW)
    assert [(s.channel, s.locale) for s in sent] == [("email", "zh-TW"), ("email", "en")]
    with pytest.raises(InputError, match="no seed address"):
        send_test(settings, "vip_appreciation", parse_seeds("+886912345678"), adapters)


@pytest.mark.slow  # a CLI process
def test_campaign_test_command_through_the_sandbox(sandbox, channel_env, tmp_path):
    r = run_cli("campaign", "test", "vip_appreciation", "--to", "qa@example.com,push:seed-token", home=tmp_path,
                env=channel_env)
    assert r.returncode == 0, r.stderr
    assert "4 of 4 test messages accepted" in r.stdout and "qa@example.com" not in r.stdout
    assert len(sandbox.messages()) == 4


def test_a_transient_failure_is_tried_again_and_a_permanent_one_is_reported(settings, monkeypatch):
    from membercare.campaigns import seed_send
    from membercare.delivery.contract import FailureReason, PermanentFailure, TransientFailure

    monkeypatch.setattr(seed_send.time, "sleep", lambda s: None)  # the retry's pause, not the behaviour
    flaky = FakeAdapter("email", lambda m, n: TransientFailure("connection reset", ambiguous=True) if n == 1 else None)
    refused = FakeAdapter("sms", lambda m, n: PermanentFailure(FailureReason.INVALID_RECIPIENT, "not a mobile"))
    down = FakeAdapter("push", lambda m, n: TransientFailure("503 from the provider", status=503))
    sent = send_test(settings, "churn_winback", parse_seeds(SEEDS),
                     {Channel.EMAIL: flaky, Channel.SMS: refused, Channel.PUSH: down})
    by_channel = {ch: {s.outcome for s in sent if s.channel == ch} for ch in ("email", "sms", "push")}
    assert by_channel["email"] == {"accepted"} and flaky.calls == 5  # 4 messages, the first tried twice
    assert all(o.startswith("refused:") for o in by_channel["sms"]) and refused.calls == 4  # never retried
    assert all(o.startswith("refused: 503") for o in by_channel["push"]) and down.calls == 4 * 3


def test_a_seed_list_can_be_named(tmp_path):
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "team.txt").write_text("mei@example.com # Mei\n+886912345679\n", encoding="utf-8")
    seeds = parse_seeds(["team", "push:tok"], lists_dir=tmp_path)
    assert [(s.channel, s.to) for s in seeds] == [(Channel.EMAIL, "mei@example.com"), (Channel.SMS, "+886912345679"),
                                                  (Channel.PUSH, "tok")]
    with pytest.raises(InputError, match="no seed list named 'nobody'"):
        parse_seeds("nobody", lists_dir=tmp_path)
