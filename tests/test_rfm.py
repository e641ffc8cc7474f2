"""RFM scoring in SQL: quintiles, ties, refunds, snapshots and the named cells."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from membercare.scoring_models import RFMCell, RFMScore
from segments.rfm import CELL_RULES, cell_of, score_rfm
from shopdata import Shop, ts

AS_OF = ts("2026-11-23T04:00Z")
rfm = RFMScore.__table__


def scores(conn, day=None) -> dict[int, dict]:
    q = sa.select(rfm)
    if day:
        q = q.where(rfm.c.as_of_date == day)
    return {r["member_id"]: dict(r) for r in conn.execute(q).mappings()}


def test_cell_grid_covers_every_score_pair_once():
    cells = {cell_of(r, f) for r in range(1, 6) for f in range(1, 6)}
    assert cells == {c.value for c in RFMCell}
    assert len(CELL_RULES) == len(RFMCell)
    assert cell_of(5, 5) == "champions" and cell_of(1, 1) == "lost" and cell_of(1, 5) == "cannot_lose"
    with pytest.raises(ValueError):
        cell_of(0, 3)


def test_quintiles_ties_refunds_and_non_buyers(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        # Ten buyers: buyer i bought i+1 times, last purchase 10*(10-i) days ago, spending (i+1) * 100.
        for i in range(10):
            s.member(f"b{i}")
            s.orders_every(f"b{i}", AS_OF - timedelta(days=10 * (10 - i) + i), n=i + 1, gap_days=1, total=100_00)
        s.member("twin")  # identical to b0: must get identical scores
        s.orders_every("twin", AS_OF - timedelta(days=100), n=1, gap_days=1, total=100_00)
        s.order("b0", AS_OF - timedelta(days=1), 999_00, status="refunded")  # never counts
        s.order("b0", AS_OF + timedelta(days=1), 999_00)  # after as_of: invisible
        s.member("never")
        run = score_rfm(conn, AS_OF)
        assert run.scored == 11 and run.as_of_date == date(2026, 11, 23)
        assert sum(run.cells.values()) == 11
        got = {s.ext_of([k]).pop(): v for k, v in scores(conn).items()}
        assert "never" not in got
        b0, twin, b9 = got["b0"], got["twin"], got["b9"]
        assert (b0["r_score"], b0["f_score"], b0["m_score"]) == (twin["r_score"], twin["f_score"], twin["m_score"])
        assert (b0["frequency"], b0["monetary_minor"], b0["recency_days"]) == (1, 100_00, 100)
        assert (b9["r_score"], b9["f_score"], b9["m_score"]) == (5, 5, 5) and b9["cell"] == "champions"
        # b0 and twin tie for the lowest frequency and recency: both score 1 (rank 1 of 11).
        assert (b0["r_score"], b0["f_score"]) == (1, 1) and b0["cell"] == "lost"
        # Scores are monotone in the underlying values.
        ordered = sorted(got.values(), key=lambda r: r["frequency"])
        assert [r["f_score"] for r in ordered] == sorted(r["f_score"] for r in ordered)
        for r in got.values():
            assert r["cell"] == cell_of(r["r_score"], r["f_score"])
        # Quintiles: with 11 buyers, each score holds two or three of them (ties aside).
        f_counts = [sum(1 for r in got.values() if r["f_score"] == k) for k in range(1, 6)]
        assert f_counts == [3, 2, 2, 2, 2]


def test_rescoring_replaces_the_snapshot_and_keeps_older_ones(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("a")
        s.order("a", AS_OF - timedelta(days=10))
        score_rfm(conn, AS_OF - timedelta(days=7))
        score_rfm(conn, AS_OF)
        s.member("b")
        s.order("b", AS_OF - timedelta(days=2))
        run = score_rfm(conn, AS_OF)
        assert run.scored == 2
        dates = conn.execute(sa.select(rfm.c.as_of_date, sa.func.count()).group_by(rfm.c.as_of_date)
                             .order_by(rfm.c.as_of_date)).all()
        assert [(d, n) for d, n in dates] == [(date(2026, 11, 16), 1), (date(2026, 11, 23), 2)]


def test_snapshot_date_is_the_shop_local_date(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("a")
        s.order("a", AS_OF - timedelta(days=3))
        late = ts("2026-11-23T17:00Z")  # already Nov 24 in Taipei
        assert score_rfm(conn, late, shop_timezone="Asia/Taipei").as_of_date == date(2026, 11, 24)
        assert score_rfm(conn, late).as_of_date == date(2026, 11, 23)


def test_window_days_limits_history(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("a")
        s.order("a", AS_OF - timedelta(days=400), 500_00)
        s.order("a", AS_OF - timedelta(days=10), 100_00)
        score_rfm(conn, AS_OF, window_days=365)
        (row,) = scores(conn).values()
        assert (row["frequency"], row["monetary_minor"]) == (1, 100_00)


def test_refund_recorded_after_as_of_does_not_rewrite_the_snapshot(engine):
    from membercare.models import Order

    with engine.begin() as conn:
        s = Shop(conn)
        s.member("a")
        s.order("a", AS_OF - timedelta(days=30), 100_00)
        late = s.order("a", AS_OF - timedelta(days=5), 400_00)
        o = Order.__table__
        conn.execute(o.update().where(o.c.id == late).values(status="refunded", updated_at=AS_OF + timedelta(days=2)))
        score_rfm(conn, AS_OF)
        (row,) = scores(conn).values()
        assert (row["frequency"], row["monetary_minor"], row["recency_days"]) == (2, 500_00, 5)
        score_rfm(conn, AS_OF + timedelta(days=3))
        (row,) = scores(conn, date(2026, 11, 26)).values()
        assert (row["frequency"], row["monetary_minor"]) == (1, 100_00)


def test_no_empty_quintile_on_cdnow_with_its_many_one_order_buyers(engine):
    # The CDNOW sample (2,357 customers, 60 % bought once): ranking frequency alone put every one-order buyer
    # in F 1 and the next ones in F 4, so F 2 and F 3 were empty. Tie-breaking by the other values fills them.
    from datetime import UTC, datetime
    from pathlib import Path

    from membercare.models import Member, Order

    rows = [line.split() for line in (Path(__file__).parent / "fixtures" / "cdnow" / "CDNOW_sample.txt")
            .read_text().splitlines() if line.strip()]
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    customers = sorted({r[1] for r in rows})
    with engine.begin() as conn:
        conn.execute(Member.__table__.insert(), [dict(
            external_id=f"cd{c}", name=f"Member {c}", email=f"cd{c}@example.com", timezone="UTC", joined_at=t0,
            tier="silver", points_balance=0, preferred_channels="email", country="TW", locale="zh-TW",
            created_at=t0, updated_at=t0) for c in customers])
        ids = dict(conn.execute(sa.select(Member.__table__.c.external_id, Member.__table__.c.id)).tuples().all())
        conn.execute(Order.__table__.insert(), [dict(
            external_id=f"cdo{i}", member_id=ids[f"cd{r[1]}"],
            placed_at=datetime.strptime(r[2], "%Y%m%d").replace(hour=12, tzinfo=UTC), status="paid",
            total_minor=int(round(float(r[4]) * 100)), currency="TWD",
            updated_at=datetime.strptime(r[2], "%Y%m%d").replace(hour=12, tzinfo=UTC)) for i, r in enumerate(rows)])
        run = score_rfm(conn, datetime(1998, 7, 1, tzinfo=UTC))
        assert run.scored == 2357
        got = list(scores(conn).values())
        for col in ("r_score", "f_score", "m_score"):
            counts = [sum(1 for r in got if r[col] == k) for k in range(1, 6)]
            assert all(0.19 * 2357 <= c <= 0.21 * 2357 for c in counts), (col, counts)
        # Still monotone: a higher frequency never scores lower.
        by_f = sorted(got, key=lambda r: r["frequency"])
        assert all(a["f_score"] <= b["f_score"] for a, b in zip(by_f, by_f[1:], strict=False)
                   if a["frequency"] < b["frequency"])
