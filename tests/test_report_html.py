"""`membercare report --html`: a self-contained file with charts, checked by rendering it in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from test_attribution import T0
from test_reports import SINCE, UNTIL, add_variant_test, build_world

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys, membercare.cli as c, membercare.cli.report; c.main(sys.argv[1:])"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)


def run_cli(*args: str, db_url: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update(MEMBERCARE_HOME=str(home), MEMBERCARE_DATABASE_URL=db_url, COLUMNS="200")
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=180)


@pytest.fixture
def html_report(sqlite_engine, sqlite_url, tmp_path) -> Path:
    from datetime import timedelta

    shop = build_world(sqlite_engine)
    add_variant_test(shop)  # a variant test and its click/conversion posteriors
    run = shop.run("news")
    control = [shop.member() for _ in range(2)]  # two members in the global control group, one of whom buys
    for m in control:
        shop.message(run, m, variant="global_control", state="skipped", channel=None)
    shop.order(control[0], T0 + timedelta(hours=5), total=2_000)
    out = tmp_path / "report.html"
    res = run_cli("report", "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "--html", str(out),
                  db_url=sqlite_url, home=tmp_path / "home")
    assert res.returncode == 0, res.stderr
    assert "Funnel" in res.stdout and "spring" in res.stdout
    return out


def test_html_is_self_contained_with_charts_and_figures(html_report):
    text = html_report.read_text(encoding="utf-8")
    # Offline: no script, no external resource of any kind.
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text
    # funnel, revenue + rate, holdout, lift, variant posteriors, frequency, trends, tiers
    assert text.count("<svg") >= 8
    # Attributed revenue NT$150 + NT$70 (the variant test's order) and SMS cost NT$3 (2 segments x NT$1.50 from
    # templates/_layout/shop.yaml).
    for figure in ("Funnel by campaign and channel", "Treated vs holdout", "Members by tier", "TWD 220", "TWD 3",
                   "spring", "Lift with 95 % intervals", "visit lift (points)", "Variant tests", "promo",
                   "P(best)", "no winner yet", "Opt-outs by weekly frequency", "Highest safe weekly frequency",
                   "global control", "Decision checks", "member-clustered interval", "MDE (80 % power)",
                   "(primary)", "Holm-adjusted p", "Sample ratio", "Promotion test", "within each of 2 run(s)"):
        assert figure in text, figure
    # The page fits 1280 px: main's padding is inside its max-width, and every table scrolls inside its section.
    assert "max-width:1280px;box-sizing:border-box" in text and ".scroll{max-width:100%;overflow-x:auto}" in text
    assert text.count("<table") == text.count("<div class='scroll'><table") > 5
    assert not re.search(r"(?<!max-)width:\s*(1[3-9]\d\d|[2-9]\d\d\d)px", text.split("<svg")[0])


@pytest.mark.slow  # several CLI processes, each importing the application
def test_cli_errors_and_json(sqlite_engine, sqlite_url, tmp_path):
    build_world(sqlite_engine)
    home = tmp_path / "home"
    res = run_cli("report", "--campaign", "nope", db_url=sqlite_url, home=home)
    assert res.returncode == 1 and "unknown campaign (with runs) 'nope'" in res.stderr and "spring" in res.stderr
    res = run_cli("report", "--by", "month", db_url=sqlite_url, home=home)
    assert res.returncode == 1 and "--by must be day or week" in res.stderr
    res = run_cli("report", "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "--json",
                  db_url=sqlite_url, home=home)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    email = next(r for r in data["funnel"] if r["channel"] == "email")
    assert (email["sent"], email["converted"], email["revenue_minor"]) == (3, 1, 10_000)


@pytest.mark.slow  # starts a headless browser
@pytest.mark.skipif(CHROMIUM is None,
                    reason="headless Chromium is not installed (looked for chromium, /usr/bin/chromium)")
def test_html_renders_in_headless_chromium(html_report, tmp_path):
    shot = tmp_path / "report.png"
    res = subprocess.run([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--hide-scrollbars",
        "--window-size=1360,2400", f"--screenshot={shot}", html_report.as_uri(),
    ], capture_output=True, text=True, timeout=120)
    assert shot.exists(), res.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1360, 2400)
    # A rendered page, not a blank or error page: a blank 1360x2400 screenshot compresses to a few KB,
    # this page (charts, cards, tables) to well over 100 KB.
    assert len(png) > 100_000, len(png)
    keep = os.environ.get("MEMBERCARE_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
