"""CLTV: the Gamma-Gamma spend model on CDNOW (published figures), value and risk formulas, high_value_at_risk."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from segments import base, churn, cltv
from segments.value import member_values
from shopdata import Shop, ts

CDNOW = Path(__file__).parent / "fixtures" / "cdnow"
CAL_END = date(1997, 9, 30)


@pytest.fixture(scope="module")
def fits() -> tuple[churn.BGNBDParams, cltv.GammaGammaParams]:
    x, m = cltv.spend_summary_cdnow(CDNOW / "CDNOW_sample.txt", CAL_END)
    bg = churn.fit_file(CDNOW / "CDNOW_sample.txt", "cdnow", CAL_END)
    return bg, cltv.fit_gamma_gamma(x, m)


def test_gamma_gamma_reproduces_the_published_cdnow_estimates(fits):
    _, gg = fits
    # Fader & Hardie (2013), 946 repeat buyers of the 2,357-customer sample: p 6.25, q 3.74, gamma 15.44.
    assert gg.customers == 946
    assert gg.p == pytest.approx(6.25, rel=0.01)
    assert gg.q == pytest.approx(3.74, rel=0.01)
    assert gg.gamma == pytest.approx(15.44, rel=0.01)


def test_expected_spend_shrinks_toward_the_population_mean(fits):
    _, gg = fits
    population = gg.p * gg.gamma / (gg.q - 1)
    got = cltv.expected_spend(gg, [0, 1, 50], [0.0, 100.0, 100.0])
    assert got[0] == pytest.approx(population)  # a single buyer: the population mean (about $35)
    assert population < got[1] < got[2] < 100.0  # more repeat purchases, more weight on the own mean


def test_risk_and_value_formulas(fits):
    bg, gg = fits
    # A single buyer cannot have dropped out: P(silent) is the Poisson-gamma zero term only.
    t, T = 13.0, 30.0
    assert float(cltv.p_no_purchase(bg, t, 0, 0, T)) == pytest.approx(((bg.alpha + T) / (bg.alpha + T + t)) ** bg.r)
    recent, lapsed = cltv.p_no_purchase(bg, t, [5, 5], [29.0, 5.0], [30.0, 30.0])
    assert 0 < recent < lapsed < 1
    # Undiscounted, the monthly sum telescopes to the expected purchases over the whole horizon.
    det0 = cltv.discounted_expected_transactions(bg, 2, 30.43, 38.86, months=12, annual_discount=0.0)
    assert float(det0) == pytest.approx(float(churn.expected_purchases(bg, 12 * cltv.WEEKS_PER_MONTH, 2, 30.43, 38.86)))
    det = cltv.discounted_expected_transactions(bg, 2, 30.43, 38.86, months=12, annual_discount=0.1)
    assert 0.9 * det0 < det < det0
    value = cltv.residual_value(bg, gg, [2, 2], [30.43, 5.0], [38.86, 38.86], [40.0, 40.0])
    assert value[0] > value[1] > 0


AS_OF = ts("2026-11-23T04:00Z")


def _shop(conn) -> Shop:
    s = Shop(conn)
    rng = np.random.default_rng(11)
    for i in range(30):
        s.member(f"big{i}")  # frequent, high spend, recent
        for k in range(8):
            s.order(f"big{i}", AS_OF - timedelta(days=240 - 30 * k + i % 5), int(rng.integers(300_00, 500_00)))
    for i in range(30):
        s.member(f"bigold{i}")  # frequent, high spend, long silent
        for k in range(8):
            s.order(f"bigold{i}", AS_OF - timedelta(days=500 - 7 * k + i % 5), int(rng.integers(300_00, 500_00)))
    for i in range(30):
        s.member(f"slipping{i}")  # frequent, high spend, monthly until about four months ago
        for k in range(8):
            s.order(f"slipping{i}", AS_OF - timedelta(days=330 - 30 * k + i % 5), int(rng.integers(300_00, 500_00)))
    for i in range(60):
        s.member(f"small{i}")
        for k in range(1 + i % 3):
            s.order(f"small{i}", AS_OF - timedelta(days=int(rng.integers(5, 400)) + k), int(rng.integers(20_00, 60_00)))
    # A big order refunded after as_of still was a purchase at as_of; one refunded before it never was.
    s.member("late_refund")
    s.order("late_refund", AS_OF - timedelta(days=20), 200_00)
    return s


def test_member_values_and_high_value_at_risk_on_a_shop(engine):
    with engine.begin() as conn:
        s = _shop(conn)
        ctx = base.SegmentContext(conn, AS_OF)
        mv = member_values(ctx, days=90)
        assert len(mv.member_id) == 151 and mv.spend.q > 1
        by_ext = {s.ext_of([i]).pop(): k for k, i in enumerate(mv.member_id)}
        big, old = by_ext["big3"], by_ext["bigold3"]
        assert mv.value[big] > mv.value[old] and mv.p_no_purchase[old] > mv.p_no_purchase[big]
        assert mv.x[by_ext["small0"]] == 0 and mv.value[by_ext["small0"]] > 0  # single buyers are valued
        got = {r["external_id"]: r for r in base.rows(ctx, base.ref("high_value_at_risk", top_share=0.5))}
        # Exactly the buyers in the top half by value whose P(no purchase in 90 days) >= 0.6, evaluated at as_of:
        # the recent big spenders are not at risk, the long-gone ones are worth nothing any more.
        cut = np.quantile(mv.value, 0.5)
        want = {e for e, k in by_ext.items() if mv.value[k] >= cut and mv.p_no_purchase[k] >= 0.6}
        assert set(got) == want and want
        # Counting and listing in one context fit the models once and reuse the temporary table.
        assert base.count(ctx, base.ref("high_value_at_risk", top_share=0.5)) == len(got)
        assert len(ctx.__dict__["_value_tables"]) == 1
        assert not any(e.startswith(("big", "bigold")) for e in got)
        row = next(iter(got.values()))
        assert row["value_at_risk"] == pytest.approx(row["value"] * row["p_no_purchase"])
        # churn_risk by value at risk: the top share by P(no purchase in 90 days) x value, single buyers included.
        var = {e: mv.value_at_risk[k] for e, k in by_ext.items()}
        cut = np.quantile(list(var.values()), 0.8)
        risky = {r["external_id"] for r in base.rows(ctx, base.ref("churn_risk", method="value_at_risk",
                                                                    top_share=0.2))}
        assert risky == {e for e, v in var.items() if v >= cut and v > 0}
        # Composes with other segments in SQL (the rows live in a temporary table of the connection).
        assert base.count(ctx, base.parse("high_value_at_risk and not churn_risk")) >= 0


def test_refund_after_as_of_does_not_rewrite_the_past(engine):
    from membercare.models import Order

    with engine.begin() as conn:
        s = _shop(conn)
        late = s.ids["late_refund"]
        o = Order.__table__
        conn.execute(o.update().where(o.c.member_id == late).values(status="refunded",
                                                                      updated_at=AS_OF + timedelta(days=3)))
        ids = set(member_values(base.SegmentContext(conn, AS_OF)).member_id.tolist())
        assert late in ids
        conn.execute(o.update().where(o.c.member_id == late).values(updated_at=AS_OF - timedelta(days=3)))
        ids = set(member_values(base.SegmentContext(conn, AS_OF)).member_id.tolist())
        assert late not in ids
