"""Campaign definitions: loading, validation errors, listing."""

from pathlib import Path

import pytest

from membercare.campaigns import (
    CampaignDefinitionError,
    campaign_names,
    list_campaigns,
    load_campaign,
)
from membercare.config import Settings
from membercare.errors import UnknownNameError
from membercare.models import Channel, Purpose

EXPECTED = {"welcome_day0", "welcome_day3", "welcome_day7", "birthday", "coupon_expiry", "vip_appreciation",
            "tier_upgrade", "churn_winback", "recommendations", "post_purchase_care", "service_recovery"}


def test_all_ready_made_campaigns_load():
    campaigns = {c.name: c for c in list_campaigns(Settings())}
    assert EXPECTED <= set(campaigns)
    for c in campaigns.values():
        assert set(c.locales) >= {"zh-TW", "en"}
        assert c.default_locale == "zh-TW"
    assert campaigns["coupon_expiry"].per_coupon
    assert campaigns["birthday"].segment.name == "birthday_today"
    assert campaigns["service_recovery"].purpose == Purpose.TRANSACTIONAL
    assert campaigns["service_recovery"].trigger.event == "review.negative"
    assert campaigns["churn_winback"].channels[0] == Channel.EMAIL


def test_offer_scales_with_member_value():
    offer = load_campaign("service_recovery", Settings()).offer
    assert offer.for_spend(0).amount_minor == 10000
    assert offer.for_spend(1_500_000).amount_minor == 30000
    assert offer.for_spend(10_000_000).amount_minor == 50000


def _write(tmp_path: Path, name: str, text: str) -> Settings:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / name / "campaign.yaml").write_text(text, encoding="utf-8")
    return Settings(templates_dir=tmp_path)


GOOD = """
description: d
purpose: marketing
segment: {name: vip}
channels: [email]
"""


def test_minimal_campaign_gets_defaults(tmp_path):
    c = load_campaign("promo", _write(tmp_path, "promo", GOOD))
    assert c.name == "promo" and c.occurrence == "daily" and c.message_per == "member"
    assert c.sms.max_segments == 2 and c.utm_name == "promo" and c.directory == tmp_path / "promo"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (GOOD.replace("marketing", "spam"), "purpose"),
        (GOOD.replace("[email]", "[email, fax]"), "channels"),
        (GOOD.replace("[email]", "[email, email]"), "listed twice"),
        (GOOD + "occurrence: yearly\n", "occurrence"),
        (GOOD + "colour: red\n", "colour"),
        (GOOD.replace("segment: {name: vip}", ""), "segment"),
        (GOOD + "default_locale: fr\n", "default_locale"),
        (GOOD + "offer: {kind: amount, steps: [{min_spend_minor: 0, percent_off: 10}]}\n", "offer"),
        (GOOD + "name: other\n", "must match its folder"),
        ("description: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_definitions_name_the_file_and_field(tmp_path, text, fragment):
    settings = _write(tmp_path, "promo", text)
    with pytest.raises(CampaignDefinitionError) as err:
        load_campaign("promo", settings)
    assert "promo/campaign.yaml" in str(err.value) and fragment in str(err.value)


def test_unknown_campaign_lists_choices(tmp_path):
    settings = _write(tmp_path, "promo", GOOD)
    (tmp_path / "_layout").mkdir()
    with pytest.raises(UnknownNameError) as err:
        load_campaign("nope", settings)
    assert "promo" in str(err.value)
    with pytest.raises(UnknownNameError):
        load_campaign("_layout", settings)
    assert campaign_names(tmp_path) == ["promo"]


def test_optimise_block_defaults_and_values(tmp_path):
    c = load_campaign("promo", _write(tmp_path, "promo", GOOD))
    assert c.optimise.routing == "preference" and c.optimise.send_time == "immediate"
    assert c.optimise.variants is None and c.optimise.is_default
    c = load_campaign("promo", _write(tmp_path, "promo", GOOD + """
optimise:
  routing: best_engagement
  send_time: best_hour
  variants: {names: [a, b, c], goal: conversion, floor: 0.1, promote_at: 0.99}
"""))
    v = c.optimise.variants
    assert (c.optimise.routing, c.optimise.send_time) == ("best_engagement", "best_hour")
    assert v.names == ("a", "b", "c") and v.control == "a" and v.goal == "conversion" and v.floor == 0.1
    assert load_campaign("churn_winback", Settings()).optimise.variants.names == ("a", "b")


@pytest.mark.parametrize("block, fragment", [
    ("routing: fastest", "optimise.routing"),
    ("send_time: later", "optimise.send_time"),
    ("variants: {names: [a]}", "optimise.variants.names"),
    ("variants: {names: [a, b, c, d, e, f, g, h, i]}", "optimise.variants.names"),
    ("variants: {names: [a, a]}", "listed twice"),
    ("variants: {names: [a, B]}", "variant name 'B'"),
    ("variants: {names: [a, holdout]}", "reserved"),
    ("variants: {names: [a, b], goal: revenue}", "optimise.variants.goal"),
    ("variants: {names: [a, b, c], floor: 0.4}", "floor 0.4 is impossible with 3 variants"),
    ("variants: {names: [a, b], promote_at: 0.5}", "optimise.variants.promote_at"),
    ("variants: {names: [a, b], winner: b}", "optimise.variants.winner"),
])
def test_invalid_optimise_blocks_name_the_field(tmp_path, block, fragment):
    with pytest.raises(CampaignDefinitionError) as err:
        load_campaign("promo", _write(tmp_path, "promo", GOOD + "optimise:\n  " + block + "\n"))
    assert fragment in str(err.value) and "campaign.yaml" in str(err.value)


def test_global_control_settings_from_the_environment():
    from membercare.errors import ConfigurationError

    s = Settings.from_env({"MEMBERCARE_GLOBAL_CONTROL_RATE": "0.05", "MEMBERCARE_GLOBAL_CONTROL_SALT": "2026"})
    assert (s.global_control_rate, s.global_control_salt) == (0.05, "2026")
    assert Settings.from_env({"MEMBERCARE_GLOBAL_CONTROL_RATE": "5%"}).global_control_rate == 0.05
    assert Settings.from_env({}).global_control_rate == 0.0
    for bad in ("abc", "1.5", "-0.1"):
        with pytest.raises(ConfigurationError, match="MEMBERCARE_GLOBAL_CONTROL_RATE"):
            Settings.from_env({"MEMBERCARE_GLOBAL_CONTROL_RATE": bad})
