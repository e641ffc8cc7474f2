"""Standard segments on hand-built shops, on SQLite and PostgreSQL: every edge the definitions name."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
import sqlalchemy as sa

import segments
from membercare.errors import InputError, UnknownNameError
from segments import base
from segments.rfm import score_rfm
from shopdata import Shop, ts

# 16:30Z on Nov 23 is 00:30 on Nov 24 in Taipei (UTC+8) but 11:30 on Nov 23 in New York (UTC-5).
AS_OF = ts("2026-11-23T16:30Z")


def run(conn, expr, as_of=AS_OF, **params) -> dict[str, dict]:
    """Evaluate and return {external_id: row}."""
    seg = base.ref(expr, **params) if isinstance(expr, str) else expr
    ctx = base.SegmentContext(conn, as_of)
    return {r["external_id"]: r for r in base.rows(ctx, seg)}


def test_registry_lists_the_standard_set():
    names = [d.name for d in segments.definitions()]
    for expected in ("new_members", "vip", "churn_risk", "birthday_today", "coupon_expiring", "high_value",
                     "mid_value", "low_value", "tier_upgrade_candidates", "lapsed_after_first_purchase",
                     "category_affinity", "region"):
        assert expected in names
    assert all(d.description and all(p.help for p in d.params) for d in segments.definitions())


def test_birthday_follows_each_members_timezone_around_midnight(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("tpe_24", tz="Asia/Taipei", birthday=date(1990, 11, 24))
        s.member("nyc_24", tz="America/New_York", birthday=date(1990, 11, 24))
        s.member("nyc_23", tz="America/New_York", birthday=date(1985, 11, 23))
        s.member("tpe_23", tz="Asia/Taipei", birthday=date(1985, 11, 23))
        s.member("nobday", tz="Asia/Taipei", birthday=None)
        today = run(conn, "birthday_today")
        assert set(today) == {"tpe_24", "nyc_23"}
        assert today["tpe_24"]["celebrate_on"] == date(2026, 11, 24)
        assert today["nyc_23"]["celebrate_on"] == date(2026, 11, 23)
        ahead = run(conn, "birthday_today", days_ahead=1)
        assert set(ahead) == {"tpe_24", "nyc_23", "nyc_24"}
        assert ahead["nyc_24"]["days_until"] == 1 and ahead["tpe_24"]["days_until"] == 0


@pytest.mark.parametrize(
    "as_of, expected",
    [
        ("2027-02-28T04:00Z", {"feb29", "feb28"}),  # non-leap year: Feb 29 celebrated on Feb 28
        ("2027-03-01T04:00Z", {"mar01"}),
        ("2028-02-28T04:00Z", {"feb28"}),  # leap year: Feb 29 birthdays wait for their day
        ("2028-02-29T04:00Z", {"feb29"}),
    ],
)
def test_feb_29_birthdays(engine, as_of, expected):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("feb29", birthday=date(2000, 2, 29))
        s.member("feb28", birthday=date(1999, 2, 28))
        s.member("mar01", birthday=date(1998, 3, 1))
        assert set(run(conn, "birthday_today", as_of=ts(as_of))) == expected


def test_feb_29_days_ahead_in_non_leap_year(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("feb29", birthday=date(2000, 2, 29))
        rows = run(conn, "birthday_today", as_of=ts("2027-02-27T04:00Z"), days_ahead=2)
        assert rows["feb29"]["celebrate_on"] == date(2027, 2, 28) and rows["feb29"]["days_until"] == 1


def test_new_members_window_and_membership_day_in_local_time(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        # Taipei local Nov 22 00:10 -> day 2 on Taipei's Nov 24.
        s.member("tpe_d2", tz="Asia/Taipei", joined="2026-11-21T16:10Z")
        # Taipei local Nov 21 23:50 -> day 3.
        s.member("tpe_d3", tz="Asia/Taipei", joined="2026-11-21T15:50Z")
        # New York local Nov 20 23:59 EST -> day 3 on New York's Nov 23; one minute later is Nov 21 -> day 2.
        s.member("nyc_d3", tz="America/New_York", joined="2026-11-21T04:59Z")
        s.member("nyc_d2", tz="America/New_York", joined="2026-11-21T05:00Z")
        s.member("old", joined="2025-01-01T00:00Z")
        s.member("future", joined="2026-11-24T00:00Z")  # joins after as_of: not a member yet
        assert set(run(conn, "new_members", day=2)) == {"tpe_d2", "nyc_d2"}
        assert set(run(conn, "new_members", day=3)) == {"tpe_d3", "nyc_d3"}
        assert set(run(conn, "new_members", days=30)) == {"tpe_d2", "tpe_d3", "nyc_d3", "nyc_d2"}
        assert run(conn, "new_members", days=30)["nyc_d2"]["days_since_joined"] == 2


def test_coupon_expiry_boundaries_and_one_row_per_member(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        for ext in ("two", "at_now", "at_edge", "past_edge", "redeemed", "redeemed_later", "issued_later"):
            s.member(ext)
        issued = "2026-11-01T00:00Z"
        s.coupon("two", "TWO-LATE", issued=issued, expires=AS_OF + timedelta(days=5))
        s.coupon("two", "TWO-SOON", issued=issued, expires=AS_OF + timedelta(days=1))
        s.coupon("at_now", "NOW", issued=issued, expires=AS_OF)  # expired at as_of already
        s.coupon("at_edge", "EDGE", issued=issued, expires=AS_OF + timedelta(days=7))  # included
        s.coupon("past_edge", "PAST", issued=issued, expires=AS_OF + timedelta(days=7, seconds=1))
        s.coupon("redeemed", "USED", issued=issued, expires=AS_OF + timedelta(days=2), redeemed="2026-11-10T00:00Z")
        s.coupon("redeemed_later", "LATER", issued=issued, expires=AS_OF + timedelta(days=2),
                 redeemed=AS_OF + timedelta(hours=1))
        s.coupon("issued_later", "NEW", issued=AS_OF + timedelta(hours=1), expires=AS_OF + timedelta(days=3))
        rows = run(conn, "coupon_expiring", days=7)
        assert set(rows) == {"two", "at_edge", "redeemed_later"}
        two = rows["two"]
        assert two["coupon_count"] == 2
        assert two["coupon_codes"].split(",") == ["TWO-SOON", "TWO-LATE"]
        assert len(two["coupon_ids"].split(",")) == 2
        assert two["first_expires_at"] == AS_OF + timedelta(days=1)
        assert set(run(conn, "coupon_expiring", days=1)) == {"two"}


def test_refunded_orders_never_count_and_members_without_orders(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("once")
        s.order("once", "2026-07-01T00:00Z", lines=[("shoes", 100_00)])
        s.order("once", "2026-08-01T00:00Z", status="refunded", lines=[("bags", 100_00)])
        s.order("once", "2026-08-02T00:00Z", status="cancelled", lines=[("bags", 100_00)])
        s.member("twice")
        s.orders_every("twice", "2026-07-01T00:00Z", n=2, gap_days=10)
        s.member("recent_once")
        s.order("recent_once", "2026-11-01T00:00Z")
        s.member("never", region="North")
        lapsed = run(conn, "lapsed_after_first_purchase")
        assert set(lapsed) == {"once"}
        assert lapsed["once"]["days_since_purchase"] == (AS_OF - ts("2026-07-01T00:00Z")).days
        assert set(run(conn, "category_affinity", category="bags", days=365)) == set()
        assert set(run(conn, "category_affinity", category="shoes,bags", days=365)) == {"once"}
        assert set(run(conn, "region", region="North")) == {"never"}
        score_rfm(conn, AS_OF)
        low = run(conn, "low_value", max_total=15)
        assert "never" not in low and low["once"]["monetary_minor"] == 100_00


def test_category_affinity_window(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("in")
        s.order("in", AS_OF - timedelta(days=89), lines=[("tea", 50_00), ("tea", 20_00), ("cups", 10_00)])
        s.member("out")
        s.order("out", AS_OF - timedelta(days=91), lines=[("tea", 50_00)])
        s.member("after")
        s.order("after", AS_OF + timedelta(days=1), lines=[("tea", 50_00)])
        rows = run(conn, "category_affinity", category="tea", days=90)
        assert set(rows) == {"in"}
        assert rows["in"]["orders_in_category"] == 1 and rows["in"]["category_spend_minor"] == 70_00


def test_vip_by_tier_and_by_rfm(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("plat", tier="platinum")
        s.member("gold", tier="gold")
        assert set(run(conn, "vip")) == {"plat"}
        ctx = base.SegmentContext(conn, AS_OF)
        assert base.count(ctx, base.ref("vip", by="rfm")) == 0
        assert any("rfm score" in n for n in ctx.notes)
        # Five buyers with rising frequency; the most frequent and most recent is the only champion.
        for i in range(5):
            s.member(f"b{i}")
            s.orders_every(f"b{i}", AS_OF - timedelta(days=200 - 30 * i), n=i + 1, gap_days=5)
        score_rfm(conn, AS_OF)
        assert set(run(conn, "vip", by="rfm")) == {"b4"}
        with pytest.raises(UnknownNameError, match="valid choices: about_to_sleep"):
            run(conn, "vip", by="rfm", cells="royalty")


def test_tier_upgrade_candidates(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        recent = AS_OF - timedelta(days=30)
        s.member("close")  # 85 % of gold's NT$10,000 bar
        s.order("close", recent, 8_500_00)
        s.member("far")
        s.order("far", recent, 7_900_00)
        s.member("there")  # meets the bar: an upgrade, not a candidate
        s.order("there", recent, 10_000_00)
        s.member("old_spend")  # outside the 365-day window
        s.order("old_spend", AS_OF - timedelta(days=400), 9_000_00)
        s.member("refund")
        s.order("refund", recent, 9_000_00, status="refunded")
        s.member("by_orders")  # 5 of gold's 6 orders
        s.orders_every("by_orders", recent, n=5, gap_days=1, total=10_00)
        s.member("gold_close", tier="gold")  # 25,000 of platinum's 30,000
        s.order("gold_close", recent, 25_000_00)
        rows = run(conn, "tier_upgrade_candidates", within_percent=20)
        assert set(rows) == {"close", "by_orders", "gold_close"}
        assert rows["close"]["next_tier"] == "gold" and rows["close"]["window_spend_minor"] == 8_500_00
        assert rows["gold_close"]["next_tier"] == "platinum" and rows["gold_close"]["spend_bar_minor"] == 3_000_000


def test_churn_risk_overdue_by_own_cadence(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("weekly_gone")  # every 10 days, then silent for 40 days: overdue
        s.orders_every("weekly_gone", AS_OF - timedelta(days=60), n=3, gap_days=10)
        s.member("monthly_ok")  # every 30 days, silent for 40 days: not yet 2x the cadence
        s.orders_every("monthly_ok", AS_OF - timedelta(days=100), n=3, gap_days=30)
        s.member("two_orders")  # too few purchases to trust a cadence
        s.orders_every("two_orders", AS_OF - timedelta(days=200), n=2, gap_days=10)
        s.member("burst")  # three orders one day, 20 days ago: below min_gap_days
        s.orders_every("burst", AS_OF - timedelta(days=20), n=3, gap_days=0.01)
        rows = run(conn, "churn_risk", method="overdue")
        assert set(rows) == {"weekly_gone"}
        assert rows["weekly_gone"]["reason"] == "overdue"
        assert rows["weekly_gone"]["days_since_last"] == 40
        assert float(rows["weekly_gone"]["mean_gap_days"]) == pytest.approx(10.0)
        assert set(run(conn, "churn_risk", method="overdue", min_gap_days=10)) == {"weekly_gone", "burst"}
        assert set(run(conn, "churn_risk", method="p_alive")) == set()  # nothing scored yet


def test_composition_and_text_form(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("n_plat", joined=AS_OF - timedelta(days=3), tier="platinum", region="North")
        s.member("n_silver", joined=AS_OF - timedelta(days=3), region="South")
        s.member("o_plat", tier="platinum", region="North")
        s.member("o_silver", region="North")
        new, vip, north = base.ref("new_members", days=7), base.ref("vip"), base.ref("region", region="North")
        ctx = base.SegmentContext(conn, AS_OF)
        ids = lambda seg: s.ext_of(r["member_id"] for r in base.rows(ctx, seg))  # noqa: E731
        assert ids(new & vip) == {"n_plat"}
        assert ids(new | vip) == {"n_plat", "n_silver", "o_plat"}
        assert ids(~vip) == {"n_silver", "o_silver"}
        assert ids(north - vip) == {"o_silver"}
        south = base.parse("(new_members or vip) except region", {"region": {"region": "South"}})
        assert ids(south) == {"n_plat", "o_plat"}
        assert ids(base.parse("vip and not new_members")) == {"o_plat"}
        assert ids(base.parse("vip & !new_members | region", {"region": {"region": "South"}})) == {"o_plat", "n_silver"}
        both = {r["external_id"]: r for r in base.rows(ctx, new | vip)}
        assert both["n_plat"]["matched"] == "both" and both["o_plat"]["matched"] == "vip"
        assert base.count(ctx, new & vip) == 1
        batches = list(base.member_id_batches(ctx, ~vip, batch_size=1))
        assert [len(b) for b in batches] == [1, 1]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: base.ref("nope"), UnknownNameError, "valid choices: back_in_stock, birthday_today, category_affinity"),
        (lambda: base.ref("new_members", weeks=2), UnknownNameError, "valid choices: day, days"),
        (lambda: base.ref("new_members", days="abc"), InputError, "must be a int"),
        (lambda: base.ref("new_members", days=0), InputError, "between 1 and 3650"),
        (lambda: base.ref("vip", by="spend"), InputError, "must be one of tier, rfm"),
        (lambda: base.ref("region"), InputError, "'region' is required"),
        (lambda: base.parse("vip and"), InputError, "expected a segment name"),
        (lambda: base.parse("(vip"), InputError, "missing ')'"),
        (lambda: base.parse("vip", {"new_members": {"days": 3}}), InputError, "not in 'vip'"),
        (lambda: base.parse_param_options(["days=3"]), InputError, "SEGMENT.NAME=VALUE"),
    ],
)
def test_bad_names_and_parameters_are_one_line_errors(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_string_parameters_are_coerced():
    assert base.ref("new_members", days="7").params == (("day", None), ("days", 7))
    assert dict(base.ref("churn_risk", p_alive_below="0.3").params)["p_alive_below"] == 0.3


def test_segments_compile_for_review(engine):
    with engine.begin() as conn:
        Shop(conn).member("x", tz="America/New_York", birthday=date(1990, 1, 1))
        ctx = base.SegmentContext(conn, AS_OF)
        sql = base.compiled_sql(ctx, base.parse("birthday_today or coupon_expiring"))
        assert "America/New_York" in sql and "coupons" in sql


def test_every_standard_segment_runs_on_an_empty_shop(engine):
    params = {"category_affinity": {"category": "tea"}, "region": {"region": "North"}}
    with engine.begin() as conn:
        ctx = base.SegmentContext(conn, AS_OF)
        for d in segments.definitions():
            assert base.count(ctx, base.ref(d.name, **params.get(d.name, {}))) == 0, d.name


def test_rows_never_load_more_than_the_limit(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        for i in range(5):
            s.member(f"m{i}", region="North")
        ctx = base.SegmentContext(conn, AS_OF)
        rows = base.rows(ctx, base.ref("region", region="North"), limit=2)
        assert [r["external_id"] for r in rows] == ["m0", "m1"]
        assert conn.execute(sa.text("select count(*) from members")).scalar() == 5


@pytest.mark.slow  # several CLI processes, each importing the application
def test_cli_count_show_and_one_line_errors(tmp_path, sqlite_url):
    from clirun import run_cli
    from membercare.db import make_engine

    eng = make_engine(sqlite_url)
    with eng.begin() as conn:
        s = Shop(conn)
        s.member("alice", region="North", email="alice.wang@example.com", phone="+886912345678")
        s.member("bob", region="South")
    eng.dispose()
    env = {"MEMBERCARE_DATABASE_URL": sqlite_url}
    shown = run_cli("segments", "show", "region", "-p", "region.region=North", "--as-of", "2026-11-23", home=tmp_path,
                    env=env)
    assert shown.returncode == 0, shown.stderr
    assert "alice" in shown.stdout and "bob" not in shown.stdout
    assert "a***@example.com" in shown.stdout and "alice.wang@" not in shown.stdout and "912345" not in shown.stdout
    counted = run_cli("segments", "count", "region or vip", "-p", "region.region=North,South", home=tmp_path, env=env)
    assert counted.returncode == 0, counted.stderr
    row = next(line for line in counted.stdout.splitlines() if "region or vip" in line)
    assert row.split("│")[2].strip() == "2"
    for args, message in [
        (("segments", "count", "nope"), "unknown segment 'nope'; valid choices: back_in_stock, birthday_today,"),
        (("segments", "show", "new_members", "-p", "new_members.weeks=2"), "valid choices: day, days"),
    ]:
        out = run_cli(*args, home=tmp_path, env=env)
        assert out.returncode == 1, out.stdout
        assert message in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
