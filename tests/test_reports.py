"""Report figures against a hand-built shop whose every number is computed by hand below (both backends)."""

from __future__ import annotations

import json
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from membercare.delivery.contract import SmsContent
from membercare.delivery.models import OutboxMessage, encode_contents
from membercare.engagement.models import EngagementEventRow
from membercare.models import Member
from membercare.optimise.lift import MeanSummary, binary_lift, mean_lift
from membercare.reports import ReportOptions, build_report
from membercare.reports.sms import refresh_sms_segments
from test_attribution import T0, Shop

SINCE, UNTIL = T0 - timedelta(days=1), T0 + timedelta(days=8)


def _inbound_stop(engine, member: int, at):
    with engine.begin() as c:
        c.execute(sa.insert(EngagementEventRow.__table__), dict(
            provider="twilio", provider_event_id=f"inbound:SM{member}", kind="inbound", channel="sms",
            message_id=None, member_id=member, occurred_at=at, received_at=at, raw="{}", reason="stop"))


def build_world(engine) -> Shop:
    """Seven members, one campaign run with email, SMS, a skipped member and two holdouts (see the tests)."""
    s = Shop(engine)
    m1, m2, m3, m4, m5, m6, m7 = (s.member() for _ in range(7))
    with engine.begin() as c:
        c.execute(sa.update(Member.__table__).where(Member.__table__.c.id == m1).values(tier="gold"))
    run = s.run("spring")
    e1, e2, e3 = (s.message(run, m) for m in (m1, m2, m3))
    sms = s.message(run, m4, channel="sms")
    with engine.begin() as c:
        c.execute(sa.update(OutboxMessage.__table__).where(OutboxMessage.__table__.c.message_id == sms).values(
            content=encode_contents({"sms": SmsContent(body="x" * 200, encoding="GSM-7", segments=2)})))
    s.message(run, m5, channel=None, state="skipped")  # no consent: planned, never sent
    s.message(run, m6, channel=None, variant="holdout", state="skipped")
    s.message(run, m7, channel=None, variant="holdout", state="skipped")
    h = timedelta(hours=1)
    for kind in ("delivered", "opened", "clicked"):
        s.event(e1, kind, T0 + h)
    s.event(e2, "delivered", T0 + h)
    s.event(e2, "opened", T0 + 2 * h)
    s.event(e2, "unsubscribed", T0 + 3 * h)
    s.event(e3, "clicked", T0 + 2 * h)  # a click without an open event (privacy proxy): implies both
    s.event(sms, "delivered", T0 + timedelta(minutes=10), channel="sms")
    _inbound_stop(engine, m4, T0 + 7 * h)  # 01:00 on Nov 3 in Taipei (still Nov 2 in UTC)
    s.order(m1, T0 + timedelta(days=1), total=10_000)
    s.order(m1, T0 - timedelta(days=30), total=8_000)
    s.order(m1, T0 - timedelta(days=400), total=20_000)
    s.order(m2, T0 + timedelta(days=1), total=9_000, status="refunded")
    s.order(m3, T0 - timedelta(days=500), total=4_000)
    s.order(m4, T0 + 2 * h, total=5_000)
    s.order(m6, T0 + timedelta(days=1), total=3_000)
    return s


@pytest.fixture
def world(engine):
    return build_world(engine)


def report(engine, **kw):
    opts = dict(since=SINCE, until=UNTIL, segments={"spring": "vip"}, sms_price_minor=150,
                timezone="Asia/Taipei", min_buyers_for_retention=1)
    return build_report(engine, ReportOptions(**{**opts, **kw}))


def test_funnel_per_campaign_segment_and_channel(world):
    r = report(world.engine)
    rows = {row.channel: row for row in r.funnel}
    assert set(rows) == {"-", "email", "sms"}
    e, s, none = rows["email"], rows["sms"], rows["-"]
    assert (e.campaign, e.segment) == ("spring", "vip")
    assert (e.planned, e.sent, e.delivered, e.opened, e.clicked) == (3, 3, 3, 3, 2)
    assert (e.converted, e.orders, e.revenue_minor, e.unsubscribed) == (1, 1, 10_000, 1)
    assert (s.planned, s.sent, s.delivered, s.opened, s.clicked) == (1, 1, 1, 0, 0)
    # SMS "delivered" is a touch by default; the STOP reply without a message id lands on the SMS sent before it.
    assert (s.converted, s.revenue_minor, s.unsubscribed) == (1, 5_000, 1)
    assert (s.sms_segments, s.sms_cost_minor) == (2, 300)
    assert (none.planned, none.sent, none.delivered, none.converted) == (1, 0, 0, 0)
    assert (r.totals.planned, r.totals.sent, r.totals.revenue_minor, r.totals.unsubscribed) == (5, 4, 15_000, 2)
    assert e.rate("clicked") == pytest.approx(2 / 3)


def test_holdout_versus_treated_with_lift(world):
    (h,) = report(world.engine).holdouts
    assert (h.campaign, h.segment) == ("spring", "vip")
    assert (h.treated_n, h.treated_converters, h.treated_revenue_minor) == (5, 2, 15_000)
    assert (h.holdout_n, h.holdout_converters, h.holdout_revenue_minor) == (2, 1, 3_000)
    expected = binary_lift(2, 5, 1, 2)
    assert h.conversion.absolute_lift == pytest.approx(2 / 5 - 1 / 2)
    assert h.conversion.absolute_lift_ci == pytest.approx(expected.absolute_lift_ci)
    rev = mean_lift(MeanSummary.from_values([10_000, 0, 0, 5_000, 0]), MeanSummary.from_values([3_000, 0]))
    assert h.revenue.absolute_lift == pytest.approx(3_000 - 1_500)
    assert h.revenue.absolute_lift_ci == pytest.approx(rev.absolute_lift_ci)
    # The stored holdout credit is the holdout arm's conversions.
    from membercare.engagement.attribution_models import Attribution

    a = Attribution.__table__
    with world.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).where(a.c.model == "holdout")).scalar_one() == 1


def test_shop_kpis(world):
    k = report(world.engine).kpis
    assert k.members_total == 7 and k.members_by_tier == {"silver": 6, "gold": 1}
    # Trailing 365 days before UNTIL: m1 (8,000 + 10,000), m4 (5,000), m6 (3,000); the refund does not count.
    assert (k.active_members, k.orders, k.revenue_minor) == (3, 4, 26_000)
    assert k.repurchase_rate == pytest.approx(1 / 3)
    assert k.aov_minor == pytest.approx(6_500)
    assert k.purchases_per_buyer_per_year == pytest.approx(4 / 3)
    # Previous year's buyers: m1 and m3; m1 bought again: retention 0.5, expected lifetime 2 years.
    assert (k.retention_rate, k.expected_lifetime_years, k.lifetime_assumed) == (0.5, 2.0, False)
    assert k.clv_minor == pytest.approx(6_500 * 4 / 3 * 2)
    assert (k.period_orders, k.period_revenue_minor, k.new_members) == (3, 18_000, 0)
    # Too few previous-year buyers for a retention estimate: the documented default lifetime is used.
    k = report(world.engine, min_buyers_for_retention=30).kpis
    assert (k.expected_lifetime_years, k.lifetime_assumed) == (3.0, True)
    assert k.clv_minor == pytest.approx(6_500 * 4 / 3 * 3)


def test_daily_and_weekly_trends_in_the_shops_timezone(world):
    r = report(world.engine)
    days = {p.bucket: p for p in r.trends}
    assert min(days) == date(2026, 11, 1) and max(days) == date(2026, 11, 10) and len(days) == 10
    nov2, nov3 = days[date(2026, 11, 2)], days[date(2026, 11, 3)]
    assert (nov2.sent, nov2.delivered, nov2.opened, nov2.clicked, nov2.unsubscribed) == (4, 3, 2, 2, 1)
    assert (nov2.conversions, nov2.revenue_minor) == (1, 5_000)
    assert (nov3.unsubscribed, nov3.conversions, nov3.revenue_minor) == (1, 1, 10_000)
    assert days[date(2026, 11, 5)].sent == 0
    weeks = report(world.engine, granularity="week", refresh=False).trends
    assert [w.bucket for w in weeks] == [date(2026, 10, 26), date(2026, 11, 2), date(2026, 11, 9)]
    assert weeks[1].sent == 4 and weeks[1].conversions == 2 and weeks[1].revenue_minor == 15_000


def test_campaign_filter_and_json(world):
    other = world.run("autumn")
    m = world.member()
    world.message(other, m)
    r = report(world.engine, campaign="autumn")
    assert [(row.campaign, row.planned) for row in r.funnel] == [("autumn", 1)]
    assert r.holdouts == []
    data = json.loads(json.dumps(r.to_dict()))
    assert data["funnel"][0]["campaign"] == "autumn" and data["attribution"]["model"] == "last_touch"


def test_sms_segment_cache_is_filled_once(world):
    assert refresh_sms_segments(world.engine) == 1
    assert refresh_sms_segments(world.engine) == 0
