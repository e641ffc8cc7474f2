"""The unsubscribed exit: a marketing consent withdrawn after entering, up to the instant judged at. A refusal
recorded with the sign-up itself (the instant the welcome journey enters) is not an unsubscribe, and an advancer
judging an earlier instant (the demo's simulated clock) does not see a later withdrawal."""

from __future__ import annotations

from datetime import timedelta

from fakes import seed_members
from membercare.consent import ConsentStatement, record_consents
from membercare.journeys.conditions import InstanceView, exit_reason
from membercare.journeys.definition import Exit

RULES = Exit(unsubscribed=True)


def test_unsubscribed_exit_counts_withdrawals_after_entry_up_to_now(engine, clock):
    joined = clock()
    with engine.begin() as conn:
        refused_at_signup, withdrew_later = seed_members(conn, 2, now=joined)
        record_consents(conn, [ConsentStatement(refused_at_signup, "sms", "marketing", False, "signup", joined),
                               ConsentStatement(withdrew_later, "email", "marketing", False, "unsubscribe",
                                                joined + timedelta(days=2))])
    with engine.connect() as conn:
        def reason(member_id: int, at_days: float) -> str | None:
            inst = InstanceView(1, "welcome_series", member_id, joined)
            return exit_reason(conn, RULES, inst, joined + timedelta(days=at_days), "Asia/Taipei")

        assert reason(refused_at_signup, 3) is None  # refused SMS when signing up: still welcomed
        assert reason(withdrew_later, 1) is None  # judged before the withdrawal
        assert reason(withdrew_later, 3) == "unsubscribed"
