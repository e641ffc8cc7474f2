"""Dates a person reads are the shop's (Asia/Taipei by default): between 00:00 and 08:00 Taipei the UTC date is
still yesterday, and campaigns, segments and reports must not disagree about which day it is."""

from datetime import UTC, datetime

from clirun import run_cli
from membercare.timeutil import shop_date_label, shop_today

EARLY = datetime(2026, 11, 22, 20, 0, tzinfo=UTC)  # 2026-11-23 04:00 in Taipei


def test_labels_and_today_use_the_shop_zone():
    assert shop_today("Asia/Taipei", EARLY).isoformat() == "2026-11-23"
    assert shop_date_label(EARLY, "Asia/Taipei") == "2026-11-23 04:00 Asia/Taipei"
    assert shop_date_label(EARLY, "Asia/Taipei", with_time=False) == "2026-11-23"
    assert shop_date_label(EARLY, "UTC") == "2026-11-22 20:00 UTC"


def test_segments_count_titles_the_shop_date(tmp_path):
    r = run_cli("segments", "count", "--as-of", "2026-11-22T20:00:00Z", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2026-11-23 04:00 Asia/Taipei" in r.stdout and "2026-11-22" not in r.stdout
