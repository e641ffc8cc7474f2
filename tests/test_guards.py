"""Safe defaults: no real send at a future as_of, no stale triggered message, no expired coupon shown as open."""

from datetime import UTC, datetime, timedelta

import pytest

from clirun import run_cli
from fakes import seed_members
from membercare.campaigns.definition import Trigger
from membercare.campaigns.occurrence import RunOptions, refuse_future_as_of
from membercare.campaigns.triggers import plan_trigger
from membercare.cli.members import coupon_state
from membercare.config import Settings
from membercare.errors import InputError
from membercare.models import Order

NOW = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)


def test_a_real_send_at_a_future_as_of_is_refused_but_a_dry_run_may_look_ahead():
    ahead = RunOptions(as_of=NOW + timedelta(days=3))
    with pytest.raises(InputError, match="in the future.*--dry-run"):
        refuse_future_as_of(ahead, NOW)
    refuse_future_as_of(RunOptions(as_of=NOW + timedelta(days=3), dry_run=True), NOW)
    refuse_future_as_of(RunOptions(as_of=NOW + timedelta(minutes=4)), NOW)  # clock skew tolerated
    refuse_future_as_of(RunOptions(as_of=NOW - timedelta(days=1)), NOW)
    refuse_future_as_of(RunOptions(), NOW)  # default: now


def test_the_cli_refuses_a_future_as_of_as_a_usage_error_before_prefect_starts(tmp_path):
    # A date far ahead of any wall clock: the refusal is independent of today's date.
    r = run_cli("campaign", "run", "birthday", "--as-of", "2999-01-01", home=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "--as-of" in r.stderr and "in the future" in r.stderr and "--dry-run" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def _order(engine, delivered_at):
    with engine.begin() as conn:
        mid = seed_members(conn, 1, now=delivered_at - timedelta(days=30))[0]
        conn.execute(Order.__table__.insert().values(external_id="O-1", member_id=mid, placed_at=delivered_at
                                                     - timedelta(days=2), status="delivered", total_minor=1000,
                                                     delivered_at=delivered_at, updated_at=delivered_at))
    return mid


def test_a_triggered_message_past_its_validity_window_is_skipped_with_the_reason(engine, settings):
    mid = _order(engine, NOW - timedelta(days=53))
    [late] = plan_trigger(engine, settings, "order.delivered", mid, order="O-1", at=NOW)
    assert late.campaign == "post_purchase_care"
    assert late.expired and "expired" in late.expired and "valid for 3 days" in late.expired
    # Reported in time (due 7 days after delivery, within the 3 days after that): sent.
    [ok] = plan_trigger(engine, settings, "order.delivered", mid, order="O-1", at=NOW - timedelta(days=44))
    assert ok.expired is None
    # Due later: not expired either (the daily sweep sends it on its day).
    [early] = plan_trigger(engine, settings, "order.delivered", mid, order="O-1", at=NOW - timedelta(days=52))
    assert early.expired is None and early.due_at > NOW - timedelta(days=52)


def test_validity_window_default_and_bounds():
    assert Trigger(event="order.delivered").valid_for_days == 3
    assert Trigger(event="review.negative", valid_for_days=14).valid_for_days == 14
    with pytest.raises(ValueError):
        Trigger(event="x", valid_for_days=-1)


def test_coupon_state_is_computed_as_of_now():
    base = {"redeemed_at": None, "expires_at": NOW + timedelta(days=1)}
    assert coupon_state(base, NOW) == "open"
    assert coupon_state({**base, "expires_at": NOW - timedelta(seconds=1)}, NOW) == "expired"
    assert coupon_state({**base, "redeemed_at": NOW - timedelta(days=3)}, NOW).startswith("redeemed")
