"""The demo's campaign table reads whole in an 80-column terminal (issue 19: 13 columns did not)."""

from __future__ import annotations

import io

from rich.console import Console

from membercare.cli.demo import campaign_table


def test_the_demo_campaign_table_fits_80_columns_with_nothing_cut():
    result = {"segment_size": 12_345, "newly_planned": 11_000, "sent": {"email": 4_321, "sms": 1_234,
              "push": 2_345, "line": 3_456}, "deferred": 120, "skipped": {"holdout": 1_100, "frequency_cap": 30},
              "suppressed": {"no_consent": 12}, "failed": {"permanent_failure": 3}, "seconds": 12.4}
    rows = [("coupon_expiry (d3)", result), ("review_recovery_apology", result), ("birthday", result)]
    out = io.StringIO()
    Console(file=out, width=80).print(campaign_table(rows, "Today's lifecycle campaigns (2026-12-05, Asia/Taipei)"))
    text = out.getvalue()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    line = next(x for x in text.splitlines() if "review_recovery_apology" in x)
    assert "4,321/1,234/2,345/3,456" in line and "1,145" in line  # sends by channel; not sent = 1,130 + 12 + 3
