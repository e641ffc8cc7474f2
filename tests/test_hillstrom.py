"""The Hillstrom e-mail experiment loaded as members, messages and outcomes, measured by the ordinary report.

The full 64,000-customer file goes through the loader into the database and the report must reproduce the
published result (men's e-mail vs no e-mail: +7.66 visit points [7.00, 8.32]) and the lift statistics of
``membercare.optimise.lift.hillstrom_lift`` computed straight from the file's columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from rich.console import Console

from membercare.delivery.models import OutboxMessage
from membercare.engagement.attribution import AttributionSettings
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import Member, Order, OrderLine
from membercare.optimise.hillstrom import DEFAULT_SENT_AT, WINDOW, load_hillstrom_rows, report_range
from membercare.optimise.lift import hillstrom_lift, load_hillstrom
from membercare.reports import ReportOptions, build_report
from membercare.reports.text import print_experiments

ROOT = Path(__file__).resolve().parent.parent
FILE = ROOT / "tests" / "fixtures" / "hillstrom" / "hillstrom.csv.zip"
HEADER = "recency,history_segment,history,mens,womens,zip_code,newbie,channel,segment,visit,conversion,spend"


def _report(engine):
    since, until = report_range()
    return build_report(engine, ReportOptions(since=since, until=until, timezone="UTC", currency="USD",
                                              attribution=AttributionSettings(window=WINDOW)))


@pytest.mark.slow  # the whole 64,000-row file, loaded and reported on each backend
def test_full_file_through_the_ordinary_report_gives_the_published_lift(engine):
    summary = load_hillstrom_rows(engine, FILE)
    assert (summary.rows, summary.loaded, summary.rejected) == (64_000, 64_000, [])
    assert summary.arms == {"Mens E-Mail": 21_307, "Womens E-Mail": 21_387, "No E-Mail": 21_306}
    # Every customer a member; an e-mail row per treated customer, a holdout row in both campaigns per control.
    assert summary.inserted["members"] == 64_000
    assert summary.inserted["outbox_messages"] == 21_307 + 21_387 + 2 * 21_306

    data = json.loads(json.dumps(_report(engine).to_dict()))
    holdouts = {h["campaign"]: h for h in data["holdouts"]}
    mens = holdouts["hillstrom_mens"]
    assert (mens["treated_n"], mens["holdout_n"]) == (21_307, 21_306)
    visit = mens["visit"]
    assert round(100 * visit["absolute_lift"], 2) == 7.66
    assert [round(100 * x, 2) for x in visit["absolute_lift_ci"]] == [7.00, 8.32]
    assert visit["significant"] and visit["p_value"] < 1e-6

    # The report's SQL aggregates equal the statistics computed from the file's columns directly.
    hs = load_hillstrom(FILE)
    for campaign, arm in (("hillstrom_mens", "Mens E-Mail"), ("hillstrom_womens", "Womens E-Mail")):
        expected = hillstrom_lift(hs, arm)
        h = holdouts[campaign]
        for name, key in (("visit", "visit"), ("conversion", "conversion")):
            e = expected[key]
            assert (h[name]["treated_successes"], h[name]["control_successes"]) == (
                e.treated_successes, e.control_successes), (campaign, name)
            assert h[name]["absolute_lift_ci"] == pytest.approx(e.absolute_lift_ci, abs=1e-12)
            assert h[name]["relative_lift_ci"] == pytest.approx(e.relative_lift_ci, abs=1e-12)
        spend = expected["spend_minor"]
        assert h["revenue"]["absolute_lift"] == pytest.approx(spend.absolute_lift, abs=1e-9)
        assert h["revenue"]["absolute_lift_ci"] == pytest.approx(spend.absolute_lift_ci, abs=1e-9)
    # Published: +0.68 conversion points and +$0.77 spend per customer for the men's e-mail.
    assert round(100 * mens["conversion"]["absolute_lift"], 2) == 0.68
    assert round(mens["revenue"]["absolute_lift"] / 100, 2) == 0.77 and mens["revenue"]["significant"]

    # The funnel sees the e-mails and their visits (clicks); attribution credits orders after a visit.
    funnel = {r["campaign"]: r for r in data["funnel"]}
    assert (funnel["hillstrom_mens"]["sent"], funnel["hillstrom_mens"]["clicked"]) == (21_307, int(
        hs.visit[hs.arm("Mens E-Mail")].sum()))
    assert funnel["hillstrom_mens"]["converted"] == int(hs.conversion[hs.arm("Mens E-Mail")].sum())
    assert funnel["hillstrom_mens"]["revenue_minor"] == int(hs.spend_minor[hs.arm("Mens E-Mail")].sum())


def _write(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "hillstrom.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


SMALL = (
    "10,2) $100 - $200,142.44,1,0,Surburban,0,Phone,Mens E-Mail,1,1,29.99",  # line 2
    "6,3) $200 - $350,329.08,1,1,Rural,1,Web,No E-Mail,1,0,0",  # line 3
    "x,1) $0 - $100,10,1,0,Urban,0,Web,No E-Mail,0,0,0",  # line 4: recency
    "2,1) $0 - $100,10,1,0,Urban,0,Web,Mens E-Mail,0,0,5",  # line 5: spend without conversion
    "2,1) $0 - $100,10.001,1,0,Urban,0,Web,Womens E-Mail,0,0,0",  # line 6: three decimals
    "2,1) $0 - $100,10,1,0,Urban,0,Fax,Womens E-Mail,0,0,0",  # line 7: channel
    "2,1) $0 - $100,10",  # line 8: short row
    "3,1) $0 - $100,50.5,0,1,Urban,1,Multichannel,Womens E-Mail,0,0,0",  # line 9
)


def _count(engine, table, *where) -> int:
    with engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()


def test_small_file_rows_rejects_and_idempotent_reload(engine, tmp_path):
    path = _write(tmp_path, *SMALL)
    s = load_hillstrom_rows(engine, path, batch_size=2)
    assert (s.rows, s.loaded) == (8, 3)
    assert [line for line, _ in s.rejected] == [4, 5, 6, 7, 8]
    reasons = dict(s.rejected)
    assert "recency" in reasons[4] and "spend without a conversion" in reasons[5]
    assert "more than two decimals" in reasons[6] and "channel" in reasons[7] and "recency" not in reasons[8]
    assert s.inserted == {"members": 3, "orders": 4, "order_lines": 4, "outbox_messages": 4, "engagement_events": 2}

    o, m, e = OutboxMessage.__table__, Member.__table__, EngagementEventRow.__table__
    with engine.connect() as c:
        member = {r.external_id: r for r in c.execute(sa.select(m))}
        rows = c.execute(sa.select(o.c.campaign, o.c.member_id, o.c.variant, o.c.state, o.c.reason_code, o.c.channel)
                         .order_by(o.c.campaign, o.c.member_id)).all()
        events = c.execute(sa.select(e.c.member_id, e.c.kind, e.c.message_id, e.c.occurred_at)).all()
    # Customer numbers are data rows: the valid ones are 1, 2 and 8.
    assert sorted(member) == ["hillstrom-00001", "hillstrom-00002", "hillstrom-00008"]
    c1, c2, c8 = (member[f"hillstrom-0000{i}"] for i in (1, 2, 8))
    assert (c1.region, c2.region, c8.region, c1.country, c1.email.endswith(".invalid")) == (
        "Suburban", "Rural", "Urban", "US", True)
    # A newbie joined at their last purchase (recency months of 30 days); others 13 months before the send.
    assert c2.joined_at == DEFAULT_SENT_AT - timedelta(days=6 * 30)
    assert c1.joined_at == DEFAULT_SENT_AT - timedelta(days=13 * 30)
    # Customer 2 (No E-Mail) is the holdout of both campaigns; 1 and 8 got their arm's e-mail.
    assert [tuple(r) for r in rows] == [
        ("hillstrom_mens", c1.id, None, "sent", "sent", "email"),
        ("hillstrom_mens", c2.id, "holdout", "skipped", "holdout", None),
        ("hillstrom_womens", c2.id, "holdout", "skipped", "holdout", None),
        ("hillstrom_womens", c8.id, None, "sent", "sent", "email"),
    ]
    by_member = {r.member_id: r for r in events}
    assert by_member[c1.id].message_id == "hsm000001" and by_member[c2.id].message_id is None
    assert all(DEFAULT_SENT_AT < r.occurred_at < DEFAULT_SENT_AT + WINDOW for r in events)
    # Past-year spend as one delivered order with a line per merchandise kind (customer 2 bought both: split).
    assert _count(engine, Order.__table__, Order.__table__.c.external_id.like("%-history")) == 3
    assert _count(engine, OrderLine.__table__) == 4
    spend = _count(engine, Order.__table__, Order.__table__.c.external_id == "hillstrom-00001-spend",
                   Order.__table__.c.total_minor == 2_999)
    assert spend == 1

    again = load_hillstrom_rows(engine, path, batch_size=5)
    assert not any(again.inserted.values()) and again.loaded == 3
    assert _count(engine, o) == 4 and _count(engine, m) == 3 and _count(engine, e) == 2

    rep = _report(engine)
    mens = next(h for h in rep.holdouts if h.campaign == "hillstrom_mens")
    assert (mens.treated_visitors, mens.treated_n, mens.holdout_visitors, mens.holdout_n) == (1, 1, 1, 1)
    assert (mens.treated_converters, mens.holdout_converters, mens.treated_revenue_minor) == (1, 0, 2_999)
    # The terminal form of the report shows each lift with its interval and verdict.
    console = Console(record=True, width=200)
    print_experiments(console, rep)
    text = console.export_text()
    assert "visit rate" in text and "hillstrom_womens" in text and "pts [" in text and "revenue / member" in text


def test_a_file_that_is_not_hillstrom_is_refused(engine, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("recency,history,segment\n1,2,No E-Mail\n", encoding="utf-8")
    with pytest.raises(InputError, match="missing column.*mens"):
        load_hillstrom_rows(engine, path)
    with pytest.raises(InputError, match="no such file"):
        load_hillstrom_rows(engine, tmp_path / "absent.csv")


ENTRY = "import sys, membercare.cli as c, membercare.cli.experiments; c.main(sys.argv[1:])"


@pytest.mark.slow  # several CLI processes, each importing the application
def test_cli_load_lists_rejects_and_report_prints_json(sqlite_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update(MEMBERCARE_HOME=str(tmp_path / "home"), COLUMNS="200")

    def run(*args):
        return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=180)

    path = _write(tmp_path, *SMALL)
    res = run("hillstrom", "load", "--file", str(path), "--db", sqlite_url)
    assert res.returncode == 1, res.stderr
    assert "5 row(s) rejected" in res.stdout and "line 4: recency" in res.stdout
    res = run("hillstrom", "report", "--db", sqlite_url, "--json")
    data = json.loads(res.stdout)
    assert {h["campaign"] for h in data["holdouts"]} == {"hillstrom_mens", "hillstrom_womens"}
    assert data["holdouts"][0]["visit"]["treated_successes"] == 1
