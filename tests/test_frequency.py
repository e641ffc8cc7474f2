"""Unsubscribe/complaint rates by weekly message count, and the evidence-based cap."""

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from membercare.optimise.frequency import (
    frequency_table,
    highest_safe_frequency,
    member_weeks,
    week_index,
    week_start,
)

MON = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def test_weeks_start_on_monday_utc():
    w = week_index([MON, MON + timedelta(days=6, hours=23), MON + timedelta(days=7), MON - timedelta(seconds=1)])
    assert w[0] == w[1] and w[2] == w[0] + 1 and w[3] == w[0] - 1
    assert week_start(int(w[0])) == MON
    # A Taipei Monday morning is still Sunday in UTC: weeks are UTC weeks.
    taipei = timezone(timedelta(hours=8))
    assert week_index([datetime(2026, 3, 2, 7, tzinfo=taipei)])[0] == w[3]


def test_member_weeks_count_messages_and_attribute_outcomes_to_the_week():
    sent_member = [1, 1, 1, 2, 1]
    sent_at = [MON, MON + timedelta(days=1), MON + timedelta(days=2), MON, MON + timedelta(days=8)]
    mw = member_weeks(sent_member, sent_at,
                      unsub_member=[1], unsub_at=[MON + timedelta(days=3)],
                      complaint_member=[2, 3], complaint_at=[MON + timedelta(days=9), MON])
    rows = sorted(zip(mw.member.tolist(), (mw.week - mw.week.min()).tolist(), mw.messages.tolist(),
                      mw.unsubscribed.tolist(), mw.complained.tolist(), strict=True))
    # Member 2's complaint is in a week without messages to them, member 3 got no message: not attributed.
    assert rows == [(1, 0, 3, True, False), (1, 1, 1, False, False), (2, 0, 1, False, False)]
    empty = member_weeks([], [])
    assert empty.messages.size == 0


def test_frequency_table_rates_and_intervals():
    rng = np.random.default_rng(5)
    n = 60_000
    messages = rng.integers(1, 11, n)
    p_unsub = 0.002 * messages  # fatigue: risk grows with frequency
    unsub = rng.random(n) < p_unsub
    complaint = rng.random(n) < 0.0002 * messages
    table = frequency_table(messages, unsub, complaint)
    assert [r.label for r in table] == ["1", "2", "3", "4", "5", "6-7", "8+"]
    assert sum(r.member_weeks for r in table) == n
    assert sum(r.messages for r in table) == int(messages.sum())
    first, last = table[0], table[-1]
    assert first.unsubscribe_rate == pytest.approx(first.unsubscribes / first.member_weeks)
    assert first.unsubscribe_rate_ci[0] <= 0.002 <= first.unsubscribe_rate_ci[1]
    assert last.unsubscribe_rate_ci[0] > first.unsubscribe_rate_ci[1]  # the fatigue is visible
    assert first.unsubscribes_per_1000_messages == pytest.approx(1000 * first.unsubscribes / first.messages)
    assert last.min_messages == 8 and last.max_messages is None
    # Ceiling of 1 % per member-week: buckets up to ~3 messages are safely under it.
    cap = highest_safe_frequency(table, max_unsubscribe_rate=0.01)
    assert cap in (2, 3)
    assert highest_safe_frequency(table, max_unsubscribe_rate=0.0001) is None
    assert highest_safe_frequency(table, max_unsubscribe_rate=1.0) == 8


def test_empty_buckets_and_thin_evidence():
    table = frequency_table([1, 1, 2], [False, True, False], [False, False, False], edges=(1, 2, 5))
    assert table[2].member_weeks == 0 and np.isnan(table[2].unsubscribe_rate)
    assert table[0].unsubscribe_rate == 0.5
    assert highest_safe_frequency(table, max_unsubscribe_rate=1.0, min_member_weeks=1) == 4  # the 2-4 bucket
    assert highest_safe_frequency(table, max_unsubscribe_rate=1.0) is None  # < 100 member-weeks
    with pytest.raises(ValueError):
        frequency_table([1], [False], [False], edges=(0, 2))


def test_table_from_sql_style_counts_equals_the_table_from_member_weeks():
    from membercare.optimise.frequency import frequency_table_from_counts

    rng = np.random.default_rng(3)
    messages = rng.integers(1, 11, size=2_000)
    unsub = rng.random(2_000) < 0.01 * messages
    compl = rng.random(2_000) < 0.002 * messages
    counts = [(m, int((messages == m).sum()), int(unsub[messages == m].sum()), int(compl[messages == m].sum()))
              for m in np.unique(messages).tolist()]
    assert frequency_table_from_counts(counts) == frequency_table(messages, unsub, compl)
    with pytest.raises(ValueError, match="inconsistent counts"):
        frequency_table_from_counts([(2, 3, 4, 0)])
