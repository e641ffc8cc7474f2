"""Cross-campaign policies: quiet hours in the member's zone, frequency caps with priority preemption."""

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from membercare.delivery.policies import (
    PolicySettings,
    QuietHours,
    RecentMessage,
    apply_frequency_cap,
    load_policy,
    quiet_hours_until,
    save_policy,
)
from membercare.errors import ConfigurationError

TPE = ZoneInfo("Asia/Taipei")  # UTC+8, no DST
NY = ZoneInfo("America/New_York")
DEFAULT = PolicySettings()


def tpe(h, m=0, day=23):
    return datetime(2026, 11, day, h, m, tzinfo=TPE).astimezone(UTC)


@pytest.mark.parametrize(
    "at, channel, purpose, zone, settings, expected",
    [
        (tpe(12), "sms", "marketing", TPE, DEFAULT, None),  # midday: allowed
        (tpe(20, 59), "sms", "marketing", TPE, DEFAULT, None),
        (tpe(21), "sms", "marketing", TPE, DEFAULT, tpe(9, day=24)),  # start is inclusive
        (tpe(23, 30), "push", "marketing", TPE, DEFAULT, tpe(9, day=24)),
        (tpe(3), "push", "marketing", TPE, DEFAULT, tpe(9)),  # after midnight: same day's 09:00
        (tpe(9), "sms", "marketing", TPE, DEFAULT, None),  # end is exclusive
        (tpe(23), "email", "marketing", TPE, DEFAULT, None),  # email is not restricted by default
        (tpe(23), "sms", "transactional", TPE, DEFAULT, None),  # transactional exempt by default
        (tpe(23), "sms", "transactional", TPE, PolicySettings(quiet_hours_for_transactional=True), tpe(9, day=24)),
        (tpe(23), "sms", "marketing", TPE, PolicySettings(quiet_hours=None), None),
        # Non-wrapping window 12:00-14:00.
        (tpe(13), "sms", "marketing", TPE, PolicySettings(quiet_hours=QuietHours(time(12), time(14))), tpe(14)),
        (tpe(15), "sms", "marketing", TPE, PolicySettings(quiet_hours=QuietHours(time(12), time(14))), None),
        # The member's zone, not the shop's: 12:00 in Taipei is 23:00 in New York (EST, UTC-5).
        (tpe(12), "sms", "marketing", NY, DEFAULT,
         datetime(2026, 11, 23, 9, tzinfo=NY).astimezone(UTC)),
    ],
)
def test_quiet_hours(at, channel, purpose, zone, settings, expected):
    assert quiet_hours_until(at, channel, purpose, zone, settings) == expected


def test_quiet_hours_end_across_dst_change_is_local_wall_clock():
    # New York springs forward on 2026-03-08: 09:00 local that morning is 13:00 UTC (EDT), not 14:00.
    at = datetime(2026, 3, 7, 22, tzinfo=NY).astimezone(UTC)
    assert quiet_hours_until(at, "sms", "marketing", NY, DEFAULT) == datetime(2026, 3, 8, 13, tzinfo=UTC)


def test_quiet_hours_rejects_empty_window():
    with pytest.raises(ConfigurationError):
        QuietHours(time(9), time(9))


T = datetime(2026, 11, 23, 2, tzinfo=UTC)


def r(id, campaign="other", priority=0, channel="email", state="sent", days_ago=1):
    return RecentMessage(id, campaign, priority, channel, state, T - timedelta(days=days_ago))


CAP3 = PolicySettings(marketing_cap=3)
SMS1 = PolicySettings(marketing_cap=3, channel_caps={"sms": 1})


@pytest.mark.parametrize(
    "chain, recent, priority, settings, exp_chain, exp_preempt, exp_capped",
    [
        (("email",), [], 0, CAP3, ("email",), (), False),
        (("email",), [r(1), r(2)], 0, CAP3, ("email",), (), False),
        # Cap reached by sent messages: nothing to preempt.
        (("email",), [r(1), r(2), r(3)], 9, CAP3, (), (), True),
        # Cap reached, one unsent lower-priority message: preempted.
        (("email",), [r(1), r(2), r(3, priority=1, state="planned")], 5, CAP3, ("email",), (3,), False),
        # Equal priority never preempts: first planned keeps the slot.
        (("email",), [r(1), r(2), r(3, priority=5, state="planned")], 5, CAP3, (), (), True),
        # A lower-priority message already being sent (or unknown) is not preempted.
        (("email",), [r(1), r(2), r(3, priority=1, state="sending")], 5, CAP3, (), (), True),
        (("email",), [r(1), r(2), r(3, priority=1, state="unknown")], 5, CAP3, (), (), True),
        # Several candidates: the lowest priority goes first.
        (("email",), [r(1), r(2, priority=2, state="deferred"), r(3, priority=1, state="planned")], 5, CAP3,
         ("email",), (3,), False),
        # Per-channel cap drops sms but the message may still go by email.
        (("sms", "email"), [r(1, channel="sms")], 0, SMS1, ("email",), (), False),
        (("sms",), [r(1, channel="sms")], 0, SMS1, (), (), True),
        # No cap configured.
        (("email",), [r(i) for i in range(10)], 0, PolicySettings(marketing_cap=None), ("email",), (), False),
    ],
)
def test_frequency_cap(chain, recent, priority, settings, exp_chain, exp_preempt, exp_capped):
    d = apply_frequency_cap(chain, recent, priority=priority, settings=settings)
    assert (d.chain, d.preempt, d.capped) == (exp_chain, exp_preempt, exp_capped)
    if d.capped:
        assert d.reason.startswith("frequency cap")


def test_policy_settings_round_trip_through_the_database(engine):
    s = PolicySettings(marketing_cap=2, channel_caps={"sms": 1},
                       quiet_hours=QuietHours(time(22), time(8), frozenset({"sms"})))
    with engine.begin() as conn:
        assert load_policy(conn) == PolicySettings()
        save_policy(conn, s)
        save_policy(conn, s)  # upsert
    with engine.connect() as conn:
        assert load_policy(conn) == s


def test_unknown_policy_setting_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="bogus"):
        PolicySettings.from_json('{"bogus": 1}')
