"""CLTV where decisions are made: the member profile, the report's arms and offer sizing (both backends).

A generated shop of 400 members (seeded) is the population the BG/NBD and Gamma-Gamma models are fitted on; the
figures are checked against the segment models (segments.value) evaluated directly.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from membercare import lifetime_value
from membercare.campaigns.definition import Offer
from membercare.models import Coupon, Member, Order
from segments import churn
from segments.base import context
from segments.value import member_values

AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=400, seed=11, as_of=AS_OF - timedelta(hours=10))
    return engine


def _buyers_and_others(engine) -> tuple[list[int], list[int]]:
    m, o = Member.__table__, Order.__table__
    with engine.connect() as conn:
        everyone = list(conn.execute(sa.select(m.c.id).order_by(m.c.id)).scalars())
        buyers = set(conn.execute(sa.select(o.c.member_id).where(o.c.placed_at <= AS_OF).distinct()).scalars())
    return [i for i in everyone if i in buyers], [i for i in everyone if i not in buyers]


def test_member_value_is_the_segment_models_value_and_p_alive(shop):
    from membercare.members import member_value

    buyers, others = _buyers_and_others(shop)
    with shop.connect() as conn:
        mv = member_values(context(conn, AS_OF))
        alive = churn.p_alive(mv.bgnbd, mv.x, mv.t_x, mv.T)
        for mid in buyers[:5] + buyers[-3:]:
            k = int(np.flatnonzero(mv.member_id == mid)[0])
            got = member_value(conn, mid, AS_OF)
            assert got.known and got.value_minor == pytest.approx(mv.value[k], rel=1e-9)
            assert got.p_alive == pytest.approx(alive[k], rel=1e-9)
            assert got.purchase_days == int(mv.x[k]) + 1 and got.value_minor > 0
        if others:
            none = member_value(conn, others[0], AS_OF)
            assert not none.known and none.value_minor is None and "no purchase" in none.note
        # Before the shop's first purchase there is no model at all: said, not raised.
        early = member_value(conn, buyers[0], AS_OF - timedelta(days=3650))
        assert not early.known and early.note.startswith("no value model")


def test_members_show_prints_the_lifetime_value(shop, db_url, tmp_path):
    from clirun import run_cli

    buyers, _ = _buyers_and_others(shop)
    with shop.connect() as conn:
        ext = conn.execute(sa.select(Member.__table__.c.external_id).where(Member.__table__.c.id == buyers[0])
                           ).scalar_one()
        expected = lifetime_value.value_snapshot(conn, AS_OF).lookup([buyers[0]])
    out = run_cli("members", "show", ext, "--as-of", AS_OF.isoformat(), home=tmp_path,
                  env={"MEMBERCARE_DATABASE_URL": db_url})
    assert out.returncode == 0, out.stderr
    assert "lifetime value (12 mo, 10%/y discount)" in out.stdout
    assert f"{expected[0][0] / 100:,.2f}" in out.stdout and f"P(alive) {expected[1][0]:.0%}" in out.stdout
    quiet = run_cli("members", "show", ext, "--no-value", home=tmp_path, env={"MEMBERCARE_DATABASE_URL": db_url})
    assert quiet.returncode == 0 and "lifetime value" not in quiet.stdout


@pytest.mark.parametrize("offer, fragment", [
    ({"kind": "amount", "size_by": "cltv", "steps": [{"min_spend_minor": 0, "amount_minor": 100}]}, "needs tiers"),
    ({"kind": "amount", "size_by": "cltv", "tiers": [{"min_cltv_minor": 5, "amount_minor": 100}]}, "start at"),
    ({"kind": "amount", "size_by": "cltv", "tiers": [{"min_cltv_minor": 0, "amount_minor": 100},
                                                      {"min_cltv_minor": 0, "amount_minor": 200}]}, "increasing"),
    ({"kind": "percent", "size_by": "cltv", "tiers": [{"min_cltv_minor": 0, "amount_minor": 100}]}, "kind"),
    ({"kind": "amount", "size_by": "value", "tiers": [{"min_cltv_minor": 0, "amount_minor": 100}]}, "size_by"),
    ({"kind": "amount", "steps": [{"min_spend_minor": 0, "amount_minor": 1}],
      "tiers": [{"min_cltv_minor": 0, "amount_minor": 100}]}, "no tiers"),
])
def test_offer_sized_by_cltv_is_validated(offer, fragment):
    with pytest.raises(ValidationError) as err:
        Offer.model_validate(offer)
    assert fragment in str(err.value)


def test_cltv_offer_picks_the_tier_of_the_value():
    offer = Offer.model_validate({"kind": "amount", "size_by": "cltv", "cltv_months": 24, "tiers": [
        {"min_cltv_minor": 0, "amount_minor": 10_000}, {"min_cltv_minor": 500_000, "amount_minor": 30_000}]})
    assert [offer.for_cltv(v).amount_minor for v in (0, 499_999, 500_000, 9e9)] == [10_000, 10_000, 30_000, 30_000]
    assert offer.for_spend(10**9).amount_minor == 10_000  # no value known: the first tier
    assert offer.cltv_months == 24 and offer.cltv_discount == 0.10


def test_offer_coupons_sized_by_cltv_fit_once_per_run(shop, tmp_path, monkeypatch):
    from membercare.campaigns.occurrence import RunOptions, prepare
    from membercare.campaigns.offers import issue_offer_coupons
    from membercare.config import Settings

    buyers, others = _buyers_and_others(shop)
    with shop.connect() as conn:
        snap = lifetime_value.value_snapshot(conn, AS_OF)
    low, high = (int(np.quantile(snap.value, q)) for q in (0.5, 0.9))
    offer = Offer.model_validate({"kind": "amount", "size_by": "cltv", "valid_days": 14, "tiers": [
        {"min_cltv_minor": 0, "amount_minor": 10_000}, {"min_cltv_minor": low, "amount_minor": 20_000},
        {"min_cltv_minor": high, "amount_minor": 40_000}]})
    settings = Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)
    ids = buyers[:150] + others[:10]
    prepared = prepare(settings, "churn_winback", RunOptions(as_of=AS_OF, members=tuple(ids)), check=False)
    camp = prepared.campaign.model_copy(update={"offer": offer})
    prepared = prepare(settings, camp, RunOptions(as_of=AS_OF, members=tuple(ids)), check=False)
    fits = []
    real = lifetime_value.value_snapshot
    monkeypatch.setattr(lifetime_value, "value_snapshot", lambda *a, **k: fits.append(1) or real(*a, **k))
    with shop.begin() as conn:  # three planning batches of one run
        assert issue_offer_coupons(conn, prepared, ids[:60]) == 60
        assert issue_offer_coupons(conn, prepared, ids[60:120]) == 60
        assert issue_offer_coupons(conn, prepared, ids[120:]) == 40
    assert len(fits) == 1  # the models are fitted per run, not per batch or member
    c = Coupon.__table__
    with shop.connect() as conn:
        got = dict(conn.execute(sa.select(c.c.member_id, c.c.amount_minor).where(c.c.campaign == "churn_winback")
                                ).tuples().all())
    value, _, known = snap.lookup(ids)
    expected = {m: offer.for_cltv(v if k else 0.0).amount_minor for m, v, k in zip(ids, value, known, strict=True)}
    assert got == expected
    assert Counter(got.values()).keys() == {10_000, 20_000, 40_000}
    assert all(got[m] == 10_000 for m in others[:10])  # no purchase: the first tier


def test_report_shows_each_arms_lifetime_value(shop):
    from rich.console import Console

    from membercare.reports import ReportOptions, build_report
    from membercare.reports.html import render_html
    from membercare.reports.text import print_experiments
    from test_attribution import Shop

    buyers, others = _buyers_and_others(shop)
    s = Shop(shop)
    s.n = 10_000  # message and order ids apart from the generated shop's
    run = s.run("winback", as_of=AS_OF)
    treated, held = buyers[:40] + others[:3], buyers[40:60]
    for m in treated:
        s.message(run, m, at=AS_OF + timedelta(hours=1))
    for m in held:
        s.message(run, m, channel=None, variant="holdout", state="skipped", at=AS_OF + timedelta(hours=1))
    for m in treated[:5] + held[:2]:
        s.order(m, AS_OF + timedelta(days=1), total=3_000)
    opts = ReportOptions(since=AS_OF, until=AS_OF + timedelta(days=2), timezone="Asia/Taipei", cltv=True,
                         min_buyers_for_retention=1)
    rep = build_report(shop, opts)
    (h,) = rep.holdouts
    with shop.connect() as conn:
        snap = lifetime_value.value_snapshot(conn, AS_OF)
    arms = {a.arm: a for a in h.cltv}
    assert (arms["treated"].members, arms["treated"].with_history) == (43, 40)
    assert (arms["holdout"].members, arms["holdout"].with_history) == (20, 20)
    assert arms["treated"].value["mean"] == pytest.approx(snap.lookup(buyers[:40])[0].mean())
    assert arms["holdout"].value["median"] == pytest.approx(np.median(snap.lookup(held)[0]))
    assert arms["treated"].converted == 5 and arms["holdout"].converted == 2
    assert arms["treated"].converted_value["mean"] == pytest.approx(snap.lookup(treated[:5])[0].mean())
    assert "2026-11-23 02:00 UTC" in h.cltv_note
    console = Console(record=True, width=250)
    print_experiments(console, rep)
    assert "expected residual lifetime value per arm" in console.export_text()
    assert "converters&#x27; mean" in render_html(rep)
