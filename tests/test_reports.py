"""Report figures against a hand-built shop whose every number is computed by hand below (both backends)."""

from __future__ import annotations

import json
import math
from datetime import date, timedelta

import pytest
import sqlalchemy as sa
from scipy import stats

from membercare.delivery.contract import SmsContent
from membercare.delivery.models import OutboxMessage, encode_contents
from membercare.engagement.models import EngagementEventRow
from membercare.models import Member
from membercare.optimise.lift import MeanSummary, binary_lift, mean_lift, wilson_interval
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


# ---------------------------------------------------------------------------------------------------------------------
# Experiment sections: visit lift, variants, frequency, programme lift against the global control group


def _resolve_event_members(engine):
    """What the receiver's store does on arrival: an event's member is its message's member."""
    e, o = EngagementEventRow.__table__, OutboxMessage.__table__
    with engine.begin() as c:
        c.execute(sa.update(e).where(e.c.member_id.is_(None)).values(member_id=sa.select(o.c.member_id).where(
            o.c.message_id == e.c.message_id).scalar_subquery()))


def test_holdout_visit_rate_counts_clicks_and_site_visits_of_either_arm(world):
    _resolve_event_members(world.engine)
    (h,) = report(world.engine).holdouts
    # m1 and m3 clicked their messages (m3 without an open event); no holdout member visited.
    assert (h.treated_visitors, h.treated_n, h.holdout_visitors, h.holdout_n) == (2, 5, 0, 2)
    assert h.visit.absolute_lift_ci == pytest.approx(binary_lift(2, 5, 0, 2).absolute_lift_ci)
    # A holdout member's click without a message id (a site visit) counts for the holdout arm, inside the
    # window only; so does a push tap.
    with world.engine.connect() as c:
        holdout_members = sorted(c.execute(sa.select(OutboxMessage.__table__.c.member_id).where(
            OutboxMessage.__table__.c.variant == "holdout")).scalars())
    m6, m7 = holdout_members
    world.event(None, "clicked", T0 + timedelta(days=2), member=m6)
    world.event(None, "push_opened", T0 + timedelta(days=8), member=m7)  # after the 7-day window
    (h,) = report(world.engine, refresh=False).holdouts
    assert (h.holdout_visitors, h.visit.control_rate) == (1, 0.5)


def add_variant_test(s: Shop) -> dict[str, int]:
    """Campaign 'promo' with variants a and b over two runs (and holdout rows, which are not a variant)."""
    members = [s.member() for _ in range(30)]
    r1 = s.run("promo", occurrence="2026-11-01")
    r2 = s.run("promo", occurrence="2026-11-02")
    earlier = T0 - timedelta(hours=12)
    for i, m in enumerate(members[:20]):
        mid = s.message(r1, m, variant="a" if i < 10 else "b", at=earlier)
        if i < 6 or i == 10:  # a: 6 clicks of 10; b: 1 click of 10
            s.event(mid, "clicked", earlier + timedelta(hours=1))
    for i, m in enumerate(members[20:28]):
        mid = s.message(r2, m, variant="a" if i < 6 else "b")
    s.message(r2, members[28], variant="b", state="skipped", channel=None)  # planned, not sent
    s.message(r2, members[29], variant="holdout", state="skipped", channel=None)
    s.order(members[0], earlier + timedelta(hours=2), total=7_000)  # credited to a's click
    return {"a_sends": 16, "b_sends": 12}


def test_variant_section_posteriors_shares_and_promotion(engine):
    s = Shop(engine)
    add_variant_test(s)
    (v,) = report(engine).variants
    assert (v.campaign, v.goal, v.latest_occurrence, v.winner) == ("promo", "click", "2026-11-02", None)
    a, b = v.variants
    assert (a.name, a.rows, a.sends, a.clicks, a.conversions, a.revenue_minor) == ("a", 16, 16, 6, 1, 7_000)
    assert (b.name, b.rows, b.sends, b.clicks, b.conversions) == ("b", 13, 12, 1, 0)
    # Beta(1 + successes, 1 + failures) on clicks per sent message.
    assert (a.posterior_alpha, a.posterior_beta, b.posterior_alpha, b.posterior_beta) == (7, 11, 2, 12)
    assert a.posterior_mean == pytest.approx(7 / 18)
    assert a.credible_interval == pytest.approx((stats.beta.ppf(0.025, 7, 11), stats.beta.ppf(0.975, 7, 11)))
    assert a.p_best > 0.95 and a.p_best + b.p_best == pytest.approx(1.0)
    # The latest run's realised shares (planned rows, holdout excluded): a 6 of 9, b 3 of 9.
    assert (a.latest_share, b.latest_share) == (pytest.approx(6 / 9), pytest.approx(3 / 9))
    # Too few sends to promote (bandit.DEFAULT_MIN_SENDS): shares keep the 5 % floor and a note says why.
    assert a.next_share + b.next_share == pytest.approx(1.0) and b.next_share >= 0.05
    assert any("sends" in n for n in v.notes)
    # The campaign's own goal and threshold (campaign.yaml optimise.variants) are used when given.
    (v,) = report(engine, refresh=False, variant_settings={"promo": {"goal": "conversion", "floor": 0.1,
                                                                      "names": ["b", "a"]}}).variants
    assert [x.name for x in v.variants] == ["b", "a"] and v.goal == "conversion" and v.floor == 0.1
    assert (v.variants[1].posterior_alpha, v.variants[1].posterior_beta) == (2, 16)
    data = json.loads(json.dumps(report(engine, refresh=False).to_dict()))
    assert data["variants"][0]["variants"][0]["name"] == "a"


def test_variant_section_shows_what_planning_recorded(engine):
    s = Shop(engine)
    add_variant_test(s)
    va = sa.table("variant_allocations", *(sa.column(c) for c in (
        "campaign", "occurrence", "as_of", "goal", "names", "shares", "winner", "reason", "report", "created_at")))
    with engine.begin() as c:
        c.execute(sa.insert(va), dict(campaign="promo", occurrence="2026-11-02", as_of=T0, goal="click", names="a,b",
                                      shares=json.dumps({"a": 0.7, "b": 0.3}), winner=None,
                                      reason="bandit: P(best) a 0.93", report="{}", created_at=T0))
    (v,) = report(engine).variants
    assert [x.planned_share for x in v.variants] == [0.7, 0.3]
    assert (v.promoted, v.plan_reason) == (None, "bandit: P(best) a 0.93")


def test_frequency_section_counts_member_weeks_by_messages_received(engine):
    s = Shop(engine)
    m1, m2, m3, m4 = (s.member() for _ in range(4))
    run = s.run("news")
    day = timedelta(days=1)
    first = s.message(run, m1, at=T0)
    s.message(run, m1, at=T0 + day)
    s.message(run, m1, at=T0 + 2 * day)
    s.event(first, "unsubscribed", T0 + 3 * day, member=m1)
    s.message(run, m2, at=T0)
    s.event(None, "complained", T0 + timedelta(hours=1), member=m2)
    s.message(run, m3, at=T0)
    s.message(run, m4, at=T0)
    s.message(run, m4, at=T0 + 7 * day)  # the next week (Taipei)
    s.message(run, m4, at=T0 + 2 * day, state="skipped", channel=None)  # not received: not counted
    s.event(None, "unsubscribed", T0 - 2 * day, member=m3)  # a week without messages: not attributed
    f = report(engine, max_unsubscribe_rate=0.99, max_complaint_rate=None, min_member_weeks=1).frequency
    one, two, three = f.buckets[:3]
    assert (one.label, one.member_weeks, one.messages, one.unsubscribes, one.complaints) == ("1", 4, 4, 0, 1)
    assert (two.member_weeks, three.member_weeks, three.unsubscribes, three.complaints) == (0, 1, 1, 0)
    assert three.unsubscribe_rate_ci == pytest.approx(wilson_interval(1, 1))
    assert (f.member_weeks, f.messages) == (5, 7)
    # The scan stops at the empty bucket 2; with a complaint ceiling, bucket 1 already fails (1 in 4).
    assert f.highest_safe == 1
    f = report(engine, refresh=False, max_unsubscribe_rate=0.99, max_complaint_rate=0.5, min_member_weeks=1).frequency
    assert f.highest_safe is None


def test_programme_lift_against_the_global_control_group(engine):
    s = Shop(engine)
    m1, m2, m3, m4, m5, m6 = (s.member() for _ in range(6))
    a, b = s.run("a"), s.run("b")
    for m in (m1, m2, m3, m4):
        s.message(a, m)
    s.message(b, m1, at=T0 + timedelta(days=1))
    for m in (m5, m6):
        s.message(a, m, variant="global_control", state="skipped", channel=None)
        s.message(b, m, variant="global_control", state="skipped", channel=None, at=T0 + timedelta(days=1))
    s.message(a, m4, variant="holdout", state="skipped", channel=None, campaign="c")  # a holdout is still marketed
    s.order(m1, T0 + timedelta(hours=2), total=10_000)
    s.order(m2, T0 - timedelta(hours=1), total=9_000)  # before the member's first message: not counted
    s.order(m3, UNTIL + timedelta(hours=1), total=9_000)  # after the period: not counted
    s.order(m5, T0 + timedelta(hours=3), total=4_000)
    r = report(engine)
    p = r.programme
    assert (p.treated_n, p.treated_converters, p.treated_revenue_minor) == (4, 1, 10_000)
    assert (p.control_n, p.control_converters, p.control_revenue_minor) == (2, 1, 4_000)
    assert p.conversion.absolute_lift_ci == pytest.approx(binary_lift(1, 4, 1, 2).absolute_lift_ci)
    expected = mean_lift(MeanSummary.from_values([10_000, 0, 0, 0]), MeanSummary.from_values([4_000, 0]))
    assert p.revenue.absolute_lift_ci == pytest.approx(expected.absolute_lift_ci)
    # Global-control rows are neither in the funnel nor in a campaign's holdout comparison.
    assert {(row.campaign, row.planned) for row in r.funnel} == {("a", 4), ("b", 1)}
    (h,) = r.holdouts
    assert (h.campaign, h.treated_n, h.holdout_n) == ("c", 0, 1) and h.conversion is None
    assert report(engine, refresh=False, since=UNTIL, until=UNTIL + timedelta(days=1)).programme is None


def test_variant_settings_come_from_the_campaigns_optimise_block():
    from types import SimpleNamespace as NS

    from membercare.reports import variant_settings_from_campaigns

    campaigns = [NS(name="plain", optimise=NS(variants=None)),
                 NS(name="promo", optimise=NS(variants=NS(names=("a", "b"), goal="conversion", floor=0.1,
                                                          promote_at=0.9)))]
    assert variant_settings_from_campaigns(campaigns) == {
        "promo": {"names": ["a", "b"], "goal": "conversion", "floor": 0.1, "promote_at": 0.9}}


def build_recurring(engine) -> Shop:
    """Eight weekly occurrences (no overlapping windows) of one campaign to the same 12 treated and 6 held-out
    members; the same four treated members and one held-out member buy after every occurrence."""
    s = Shop(engine)
    treated, held = [s.member() for _ in range(12)], [s.member() for _ in range(6)]
    for k in range(8):
        at = T0 + timedelta(days=8 * k)
        run = s.run("weekly", occurrence=f"w{k}")
        for m in treated:
            s.message(run, m, at=at)
        for m in held:
            s.message(run, m, channel=None, variant="holdout", state="skipped", at=at)
        for m in treated[:4] + held[:1]:
            s.order(m, at + timedelta(hours=5), total=1_000)
    return s


def test_recurring_campaign_intervals_are_member_clustered(engine):
    from membercare.reports.stats import minimum_detectable_effect

    s = build_recurring(engine)
    until = T0 + timedelta(days=64)
    (h,) = report(s.engine, until=until, holdout_rates={"weekly": 1 / 3}).holdouts
    assert (h.treated_n, h.treated_members, h.treated_converters) == (96, 12, 32)
    assert (h.holdout_n, h.holdout_members, h.holdout_converters) == (48, 6, 8)
    c = h.checks.metric("conversion")
    assert c.role == "primary" and c.difference == pytest.approx(32 / 96 - 8 / 48)
    # The same members in every occurrence (here with perfectly repeated outcomes): the report's interval is the
    # member-clustered one, much wider than the rows-as-independent interval.
    width = c.interval[1] - c.interval[0]
    assert width > 2 * (c.naive_interval[1] - c.naive_interval[0])
    assert width > h.conversion.absolute_lift_ci[1] - h.conversion.absolute_lift_ci[0]
    assert c.design_effect > 4
    assert c.mde == pytest.approx(minimum_detectable_effect(96, 48, 8 / 48, design_effect=c.design_effect))
    assert c.underpowered and h.checks.verdict == "no effect shown (underpowered)"
    assert {m.role for m in h.checks.metrics[1:]} == {"secondary"}
    # Eight runs at the configured third held out: no sample-ratio mismatch.
    assert len(h.sample_ratio) == 8 and not h.mismatched_runs


def test_sample_ratio_mismatch_is_flagged_per_run_and_voids_the_verdict(engine):
    s = build_recurring(engine)
    (h,) = report(s.engine, until=T0 + timedelta(days=64), refresh=False, holdout_rates={"weekly": 0.02}).holdouts
    assert len(h.mismatched_runs) == 8
    r = h.mismatched_runs[0]
    assert (r.treated, r.holdout, r.expected_holdout_share) == (12, 6, 0.02) and r.p_value < 0.001
    assert h.checks.verdict.startswith("not trustworthy")


def test_primary_metric_is_judged_alone_and_the_others_are_holm_adjusted(engine):
    s = build_recurring(engine)
    (h,) = report(s.engine, until=T0 + timedelta(days=64), refresh=False,
                  primary_metrics={"weekly": "revenue"}).holdouts
    first, *rest = h.checks.metrics
    assert (h.checks.primary, first.metric, first.role) == ("revenue", "revenue", "primary")
    assert first.adjusted_p == first.p_value
    assert sorted(m.metric for m in rest) == ["conversion", "visit"]
    ps = sorted(m.p_value for m in rest if not math.isnan(m.p_value))
    adjusted = sorted(m.adjusted_p for m in rest if not math.isnan(m.p_value))
    assert adjusted[0] == pytest.approx(min(1.0, len(ps) * ps[0]))
    assert all(a >= p for a, p in zip(adjusted, ps, strict=True))


def test_a_purchase_counts_for_one_occurrence_only(engine):
    """Overlapping occurrences of a daily campaign: a purchase is attributed to the latest row of the member's
    campaign scheduled at or before it (within that row's window), never to two rows."""
    s = Shop(engine)
    m1, m2, m3 = s.member(), s.member(), s.member()
    first, second = s.run("daily", occurrence="d1"), s.run("daily", occurrence="d2")
    day = timedelta(days=1)
    for run, at in ((first, T0), (second, T0 + day)):
        s.message(run, m1, at=at)
        s.message(run, m2, at=at)
        s.message(run, m3, channel=None, variant="holdout", state="skipped", at=at)
    s.order(m1, T0 + 2 * day, total=10_000)  # after both rows, in both windows: the second row only
    s.order(m2, T0 + day / 2, total=7_000)  # before the second row: the first row only
    s.order(m3, T0 + 3 * day, total=3_000)  # a holdout purchase: once too
    (h,) = report(engine).holdouts
    assert (h.treated_n, h.treated_converters, h.treated_revenue_minor) == (4, 2, 17_000)
    assert (h.holdout_n, h.holdout_converters, h.holdout_revenue_minor) == (2, 1, 3_000)


def test_primary_metric_and_holdout_rate_come_from_campaign_yaml(tmp_path):
    from membercare.campaigns.definition import CampaignDefinitionError, parse_campaign

    def campaign(name: str, extra: str):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "campaign.yaml"
        path.write_text(f"description: d\npurpose: marketing\nsegment: {{name: s}}\nchannels: [email]\n{extra}")
        return parse_campaign(path)

    plain = campaign("plain", "")
    assert ReportOptions.campaign_fields([campaign("none", "params: {holdout_rate: 0}\n")])["holdout_rates"] == {
        "none": 0.0}
    revenue = campaign("spend", "primary_metric: revenue\nparams: {holdout_rate: 0.2}\n")
    assert (plain.primary_metric, revenue.primary_metric) == ("conversion", "revenue")
    assert ReportOptions.campaign_fields([plain, revenue]) == {
        "primary_metrics": {"plain": "conversion", "spend": "revenue"}, "holdout_rates": {"plain": 0.1, "spend": 0.2}}
    with pytest.raises(CampaignDefinitionError, match="primary_metric"):
        campaign("bad", "primary_metric: opens\n")


def _bulk_variant_run(engine, run: int, occurrence: str, members: list[int], variants: list[str],
                      clicked: list[bool], at) -> None:
    rows, events = [], []
    for i, (m, v, c) in enumerate(zip(members, variants, clicked, strict=True)):
        mid = f"{occurrence}-{i}"
        rows.append(dict(message_id=mid, run_id=run, campaign="drift", occurrence=occurrence, member_id=m,
                         idempotency_key=f"drift|{occurrence}|{m}", variant=v, purpose="marketing", priority=0,
                         channel="email", fallback_channels="", state="sent", reason_code="sent", reason="test",
                         attempts=1, transient_failures=0, scheduled_at=at, sent_at=at, created_at=at, updated_at=at))
        if c:
            events.append(dict(provider="sendgrid", provider_event_id=f"ev-{mid}", kind="clicked", channel="email",
                               message_id=mid, member_id=m, occurred_at=at + timedelta(hours=1),
                               received_at=at + timedelta(hours=1), raw="{}"))
    with engine.begin() as c:
        c.execute(sa.insert(OutboxMessage.__table__), rows)
        c.execute(sa.insert(EngagementEventRow.__table__), events)


def test_variant_test_is_stratified_per_run_so_drift_is_no_winner(engine):
    """Two identical variants; the click rate falls from 40 % to 5 % between runs while the bandit moves the
    shares from 90/10 to 10/90. Pooled, a looks far better (36.5 % vs 8.5 %); within each run they are equal."""
    from membercare.optimise import bandit

    s = Shop(engine)
    with engine.begin() as c:
        members = list(c.execute(sa.insert(Member.__table__).returning(Member.__table__.c.id), [
            dict(external_id=f"D{i}", name=f"D {i}", email=f"d{i}@example.test", joined_at=T0 - timedelta(days=99))
            for i in range(400)]).scalars())
    for k, (share_a, rate) in enumerate(((0.9, 0.4), (0.1, 0.05))):
        occurrence = f"2026-11-0{k + 1}"
        run = s.run("drift", occurrence=occurrence)
        n_a = int(400 * share_a)
        variants = ["a"] * n_a + ["b"] * (400 - n_a)
        clicked = [i < round(rate * n_a) for i in range(n_a)] + [i < round(rate * (400 - n_a))
                                                                for i in range(400 - n_a)]
        _bulk_variant_run(engine, run, occurrence, members, variants, clicked, T0 + timedelta(days=k))
    (v,) = report(engine, refresh=False).variants
    a, b = v.variants
    assert (a.sends, a.clicks, b.sends, b.clicks) == (400, 146, 400, 34)
    assert v.runs == 2 and v.winner is None
    assert v.evidence is not None and v.evidence["runs"] == 2
    assert v.evidence["pairs"][0]["difference"] == pytest.approx(0.0, abs=1e-12)
    # The same counts pooled into one run would have promoted a.
    pooled = bandit.allocate([bandit.VariantStats("a", 400, 146), bandit.VariantStats("b", 400, 34)])
    assert pooled.winner == "a"


def test_text_report_shows_the_checks(engine):
    from rich.console import Console

    from membercare.reports.text import print_experiments

    s = build_recurring(engine)
    console = Console(record=True, width=250)
    print_experiments(console, report(s.engine, until=T0 + timedelta(days=64), holdout_rates={"weekly": 0.02}))
    out = console.export_text()
    for text in ("member-clustered CI", "naive CI", "Holm p", "(primary)", "SAMPLE-RATIO MISMATCH in 8 of 8",
                 "not trustworthy: sample ratio mismatch", "larger than the observed effect", "primary)"):
        assert text in out, text


def test_variant_arms_against_the_holdout_are_holm_adjusted(engine):
    s = Shop(engine)
    a_members, b_members, held = ([s.member() for _ in range(6)] for _ in range(3))
    for k in range(3):
        at = T0 + timedelta(days=8 * k)
        run = s.run("ab", occurrence=f"w{k}")
        for arm, members in (("a", a_members), ("b", b_members), ("holdout", held)):
            for m in members:
                s.message(run, m, at=at, variant=arm, **({"channel": None, "state": "skipped"} if arm == "holdout"
                                                          else {}))
        for m in a_members[:4] + b_members[:1]:
            s.order(m, at + timedelta(hours=5), total=1_000)
    (h,) = report(engine, until=T0 + timedelta(days=30)).holdouts
    assert (h.treated_n, h.treated_converters, h.holdout_converters) == (36, 15, 0)
    assert [x.arm for x in h.arms] == ["a", "b"]
    a, b = (x.check for x in h.arms)
    assert (a.metric, a.role) == ("conversion", "arm vs holdout")
    assert a.difference == pytest.approx(4 / 6) and b.difference == pytest.approx(1 / 6)
    assert a.adjusted_p == pytest.approx(min(1.0, 2 * a.p_value)) and b.adjusted_p >= b.p_value
    assert a.significant
    from rich.console import Console

    from membercare.reports.html import render_html
    from membercare.reports.text import print_experiments

    console = Console(record=True, width=250)
    rep = report(engine, until=T0 + timedelta(days=30), refresh=False)
    print_experiments(console, rep)
    assert "ab: variants vs holdout on conversion rate, Holm across 2 arms" in console.export_text()
    assert "Holm-adjusted p (across arms)" in render_html(rep)
