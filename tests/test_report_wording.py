"""What the report says when it cannot recommend a frequency, and how it names funnel rows without a channel:
two wordings a marketer misread (issue 19), checked in the text and HTML forms."""

from __future__ import annotations

import io

from rich.console import Console

from membercare.optimise.frequency import frequency_table_from_counts, highest_safe_frequency
from membercare.reports.frequency import FrequencySection
from membercare.reports.funnel import NO_CHANNEL, NO_CHANNEL_LABEL, channel_label
from membercare.reports.text import _print_frequency


def section(counts, *, ceiling=0.005, min_weeks=100) -> FrequencySection:
    buckets = frequency_table_from_counts(counts)
    return FrequencySection(buckets=buckets, max_unsubscribe_rate=ceiling, max_complaint_rate=None,
                            min_member_weeks=min_weeks,
                            highest_safe=highest_safe_frequency(buckets, max_unsubscribe_rate=ceiling,
                                                                min_member_weeks=min_weeks),
                            member_weeks=sum(b.member_weeks for b in buckets),
                            messages=sum(b.messages for b in buckets))


def printed(f: FrequencySection) -> str:
    out = io.StringIO()
    _print_frequency(Console(file=out, width=200), f, "95%")
    return out.getvalue()


def test_a_rate_under_the_ceiling_with_a_wide_interval_is_not_called_above_the_ceiling():
    # 0.34 % observed (7 of 2,060 member-weeks at one message a week) under a 0.5 % ceiling: the upper bound
    # is above it, which is what keeps the answer "none" - not the rate itself.
    f = section([(1, 2060, 7, 0), (2, 900, 4, 0)])
    assert f.highest_safe is None
    why = f.why_none_safe()
    assert "0.34 %" in why and "upper 95 % bound" in why and "0.50 % ceiling" in why
    text = printed(f)
    assert "even one message a week is above the ceiling" not in text
    assert "upper 95 % bound" in " ".join(text.split())  # rich wraps the long line


def test_too_few_member_weeks_is_said_as_such():
    f = section([(1, 40, 0, 0)])
    assert f.highest_safe is None
    assert f.why_none_safe() == "too little evidence: 40 member-weeks at 1 message a week, 100 needed"


def test_a_safe_frequency_is_still_shown_as_a_number():
    f = section([(1, 50_000, 10, 0), (2, 40_000, 12, 0)])
    assert f.highest_safe == 2
    assert "): 2" in " ".join(printed(f).split())


def test_rows_without_a_channel_are_named_and_explained():
    assert channel_label(NO_CHANNEL) == NO_CHANNEL_LABEL == "none"
    assert channel_label("line") == "line"


def test_the_frequency_table_keeps_every_column_whole_at_80_columns():
    f = section([(1, 50_000, 10, 3), (2, 40_000, 12, 1), (6, 2000, 5, 1), (8, 1_200_000, 900, 200)])
    out = io.StringIO()
    _print_frequency(Console(file=out, width=80), f, "95%")
    table = out.getvalue()
    assert "…" not in table  # no header or cell cut
    assert all(len(line) <= 80 for line in table.splitlines())
    row = next(line for line in table.splitlines() if line.strip().startswith("8+"))
    assert "0.075 (0.070-0.080)" in row and "0.017 (0.015-0.019)" in row  # the complaint column is whole
