"""BG/NBD: the published CDNOW estimates, the scoring pipeline on a shop, and the CLI."""

from __future__ import annotations

import csv
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from clirun import run_cli
from membercare.errors import InputError, UnknownNameError
from membercare.scoring_models import ChurnModelFit, ChurnScore
from segments import base, churn
from segments.churn_scoring import score_churn
from shopdata import Shop, ts

CDNOW = Path(__file__).parent / "fixtures" / "cdnow"
CAL_END = date(1997, 9, 30)


def sig3(x: float) -> str:
    return f"{x:.3g}"


@pytest.fixture(scope="module")
def cdnow_fit() -> churn.BGNBDParams:
    return churn.fit_file(CDNOW / "CDNOW_sample.txt", "cdnow", CAL_END)


def test_reproduces_published_cdnow_estimates(cdnow_fit):
    p = cdnow_fit
    # Fader, Hardie and Lee (2005): r = 0.243, alpha = 4.414, a = 0.793, b = 2.426, LL = -9582.4.
    assert (sig3(p.r), sig3(p.alpha), sig3(p.a), sig3(p.b)) == ("0.243", "4.41", "0.793", "2.43")
    assert p.r == pytest.approx(0.243, abs=5e-4) and p.alpha == pytest.approx(4.414, abs=5e-3)
    assert p.a == pytest.approx(0.793, abs=5e-4) and p.b == pytest.approx(2.426, abs=5e-3)
    assert p.log_likelihood == pytest.approx(-9582.4, abs=0.05)
    assert p.customers == 2357


def test_conditional_expectation_of_published_example(cdnow_fit):
    # 1.226 expected purchases in the next 39 weeks for x = 2, t_x = 30.43, T = 38.86.
    assert float(churn.expected_purchases(cdnow_fit, 39, 2, 30.43, 38.86)) == pytest.approx(1.226, abs=5e-4)


def test_transaction_summary_matches_the_published_summary():
    s = churn.summarise_transactions(churn.read_cdnow(CDNOW / "CDNOW_sample.txt"), CAL_END)
    with open(CDNOW / "cdnow_customers_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert s.customers == len(rows) == 2357
    assert np.array_equal(np.sort(s.x), np.sort([float(r["frequency"]) for r in rows]))
    assert np.allclose(np.sort(s.T), np.sort([float(r["T"]) for r in rows]), atol=0.006)


def test_p_alive_properties(cdnow_fit):
    p = cdnow_fit
    assert float(churn.p_alive(p, 0, 0, 30)) == 1.0  # BG/NBD: no repeat purchase, never "dead"
    recent, stale = churn.p_alive(p, [5, 5], [30, 5], [31, 31])
    assert 0.85 < recent < 1.0 and stale < 0.2
    # Expected purchases grow with the horizon and vanish for a long-gone customer.
    e = churn.expected_purchases(p, np.array([1.0, 10.0, 100.0]), 3, 20, 38)
    assert np.all(np.diff(e) > 0)


def test_grouped_rows_with_counts_give_the_same_fit():
    # The shop pipeline fits distinct (x, t_x, T) rows weighted by their member counts.
    with open(CDNOW / "cdnow_customers_summary.csv") as fh:
        rows = [(float(r["frequency"]), float(r["recency"]), float(r["T"])) for r in csv.DictReader(fh)]
    arr = np.array(rows)
    uniq, counts = np.unique(arr, axis=0, return_counts=True)
    assert len(uniq) < len(arr)
    full = churn.fit(churn.Summary.from_arrays(arr[:, 0], arr[:, 1], arr[:, 2]))
    grouped = churn.fit(churn.Summary.from_arrays(uniq[:, 0], uniq[:, 1], uniq[:, 2], counts))
    for k in ("r", "alpha", "a", "b", "log_likelihood"):
        assert getattr(grouped, k) == pytest.approx(getattr(full, k), rel=1e-4), k
    assert grouped.customers == full.customers == 2357


def test_input_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="valid choices: cdnow, orders-csv"):
        churn.fit_file(CDNOW / "CDNOW_sample.txt", "excel", CAL_END)
    with pytest.raises(InputError, match="no purchases on or before"):
        churn.fit_file(CDNOW / "CDNOW_sample.txt", "cdnow", date(1990, 1, 1))
    bad = tmp_path / "o.csv"
    bad.write_text("who,when\n1,2020-01-01\n")
    with pytest.raises(InputError, match="need a customer column"):
        churn.fit_file(bad, "orders-csv", CAL_END)
    with pytest.raises(ValueError):
        churn.Summary.from_arrays([1], [5], [3])  # t_x > T


def test_orders_csv_skips_refunds_and_merges_same_day(tmp_path):
    f = tmp_path / "orders.csv"
    f.write_text(
        "member_id,placed_at,status\n"
        "a,2024-01-01T10:00:00Z,paid\n"
        "a,2024-01-01T18:00:00Z,paid\n"  # same day: one purchase
        "a,2024-01-15,delivered\n"
        "a,2024-01-20,refunded\n"  # not a purchase
        "b,2024-01-10,paid\n"
    )
    s = churn.summarise_transactions(churn.read_orders_csv(f), date(2024, 1, 29))
    got = sorted(zip(s.x, s.t_x * 7, s.T * 7, strict=True))
    assert got == [(0.0, 0.0, 19.0), (1.0, 14.0, 28.0)]


@pytest.mark.slow  # several CLI processes, each importing the application
def test_cli_fit_prints_json(tmp_path):
    out = run_cli("churn", "fit", "--transactions", str(CDNOW / "CDNOW_sample.txt"), "--format", "cdnow",
                  "--calibration-end", "1997-09-30", "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"r", "alpha", "a", "b", "log_likelihood", "customers"}
    assert (round(data["r"], 3), round(data["alpha"], 3), round(data["a"], 3), round(data["b"], 3)) == \
        (0.243, 4.414, 0.793, 2.426)
    assert round(data["log_likelihood"], 1) == -9582.4 and data["customers"] == 2357
    bad = run_cli("churn", "fit", "--transactions", str(CDNOW / "CDNOW_sample.txt"), "--format", "xls",
                  "--calibration-end", "1997-09-30", home=tmp_path)
    assert bad.returncode == 1 and "valid choices: cdnow, orders-csv" in bad.stderr
    assert "Traceback" not in bad.stderr


AS_OF = ts("2026-11-23T04:00Z")


def _shop(conn) -> Shop:
    """Forty buyers: steady ones still buying, lapsed frequent ones, one-off ones and a refund-only member."""
    s = Shop(conn)
    rng = np.random.default_rng(7)
    for i in range(15):
        s.member(f"steady{i}")
        s.orders_every(f"steady{i}", AS_OF - timedelta(days=300 - i), n=10, gap_days=30)
    for i in range(15):
        s.member(f"gone{i}")
        s.orders_every(f"gone{i}", AS_OF - timedelta(days=400 + i), n=6, gap_days=7)
    for i in range(10):
        s.member(f"once{i}")
        s.order(f"once{i}", AS_OF - timedelta(days=int(rng.integers(10, 300))))
    s.member("refunded")
    s.order("refunded", AS_OF - timedelta(days=5), status="refunded")
    s.member("never")
    # Same day twice: merged into one purchase day.
    s.order("steady0", AS_OF - timedelta(days=300, hours=-2))
    return s


def test_score_churn_stores_fit_and_scores(engine):
    with engine.begin() as conn:
        s = _shop(conn)
        run = score_churn(conn, AS_OF, horizon_days=30)
        assert run.scored == 40 and run.as_of_date == date(2026, 11, 23)
        cs = ChurnScore.__table__
        got = {s.ext_of([r.member_id]).pop(): r for r in conn.execute(sa.select(cs))}
        assert "refunded" not in got and "never" not in got
        assert got["steady0"].frequency == 9  # ten days, the same-day extra order merged
        assert got["steady3"].p_alive > 0.7 and got["gone3"].p_alive < 0.2
        assert got["once1"].p_alive == 1.0 and got["once1"].frequency == 0
        assert got["steady3"].expected_purchases > got["gone3"].expected_purchases
        fit = conn.execute(sa.select(ChurnModelFit.__table__)).one()
        assert fit.customers == 40 and fit.horizon_days == 30 and fit.id == run.fit_id
        # Re-scoring the same date replaces the snapshot.
        score_churn(conn, AS_OF)
        assert conn.execute(sa.select(sa.func.count()).select_from(cs)).scalar() == 40
        assert conn.execute(sa.select(sa.func.count()).select_from(ChurnModelFit.__table__)).scalar() == 1

        ctx = base.SegmentContext(conn, AS_OF)
        at_risk = {r["external_id"]: r for r in base.rows(ctx, base.ref("churn_risk", method="p_alive"))}
        assert set(at_risk) == {f"gone{i}" for i in range(15)}
        assert all(r["reason"] == "p_alive" and r["p_alive"] < 0.5 for r in at_risk.values())
        either = {r["external_id"]: r["reason"] for r in base.rows(ctx, base.ref("churn_risk"))}
        assert set(either) == set(at_risk) and set(either.values()) == {"p_alive+overdue"}
        # A purchase after the snapshot takes the member out of the p_alive rule.
        s.order("gone0", AS_OF + timedelta(days=1))
        later = base.SegmentContext(conn, AS_OF + timedelta(days=2))
        assert "gone0" not in {r["external_id"] for r in base.rows(later, base.ref("churn_risk", method="p_alive"))}


def test_score_churn_without_repeat_buyers_is_an_input_error(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("a")
        s.order("a", AS_OF - timedelta(days=3))
        with pytest.raises(InputError, match="no repeat buyers"):
            score_churn(conn, AS_OF)
