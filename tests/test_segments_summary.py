"""Segments and RFM read order_summary where it is exact: results equal the all-orders path at any as_of."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from membercare.data.generator import generate_shop
from membercare.models import Order, OrderLine, OrderSummary
from segments import base
from segments.rfm import rfm_select
from segments.summary import AllOrdersContext as RawOrdersContext

AS_OF = datetime(2026, 11, 23, 16, tzinfo=UTC)
# Now, a day before the newest refunds, and dates well inside the shop's history (members bought since).
DATES = (AS_OF, AS_OF - timedelta(days=20, hours=7), AS_OF - timedelta(days=95), AS_OF - timedelta(days=400),
         AS_OF + timedelta(days=30))


def _every_segment(conn) -> list[base.Segment]:
    ol, m = OrderLine.__table__, sa.table("members", sa.column("region"))
    cat = conn.execute(sa.select(ol.c.category).group_by(ol.c.category).order_by(sa.func.count().desc())).scalar()
    reg = conn.execute(sa.select(m.c.region).where(m.c.region.is_not(None)).group_by(m.c.region)
                       .order_by(sa.func.count().desc())).scalar()
    params = {"category_affinity": {"category": cat}, "region": {"region": reg}}
    out: list[base.Segment] = [base.ref(d.name, **params.get(d.name, {})) for d in base.definitions()
                               if d.name != "high_value_at_risk"]  # fits models in Python: slow, reads no summary
    out += [base.ref("churn_risk", method="overdue", min_orders=2, min_gap_days=10),
            base.ref("lapsed_after_first_purchase", min_days=1, max_days=3000)]
    return out


def _rows(conn, stmt) -> list[tuple]:
    return sorted(tuple(r) for r in conn.execute(stmt))


@pytest.fixture
def shop(engine):
    generate_shop(engine, members=300, seed=7, as_of=AS_OF, batch_size=150)
    with engine.begin() as conn:
        # Refunds recorded at different times: between the dates above, so each date sees a different state.
        o = Order.__table__
        ids = conn.execute(sa.select(o.c.id).where(o.c.status == "delivered", o.c.placed_at < AS_OF - timedelta(
            days=120)).order_by(o.c.id)).scalars().all()
        for i, oid in enumerate(ids[::7]):
            touched = AS_OF - timedelta(days=(5, 21, 60, 300)[i % 4])
            conn.execute(o.update().where(o.c.id == oid).values(status="refunded", updated_at=touched))
    return engine


def test_every_standard_segment_and_rfm_match_the_all_orders_path_at_several_dates(shop):
    with shop.connect() as conn:
        segs = _every_segment(conn)
        nonempty = set()
        for as_of in DATES:
            fast, slow = base.SegmentContext(conn, as_of, "Asia/Taipei"), RawOrdersContext(conn, as_of, "Asia/Taipei")
            for seg in segs:
                got, want = _rows(conn, seg.select(fast)), _rows(conn, seg.select(slow))
                assert got == want, (seg.label, as_of)
                if got:
                    nonempty.add(seg.label)
            got, want = _rows(conn, rfm_select(fast)), _rows(conn, rfm_select(slow))
            assert got == want and got, as_of
        # The comparison means something: the order-based segments have members at some date.
        assert {"churn_risk", "lapsed_after_first_purchase"} <= nonempty


def test_the_rule_members_active_after_as_of_are_read_from_orders(shop):
    """At a past date the summary answers only members quiet since; the others come from their orders."""
    past = AS_OF - timedelta(days=95)
    with shop.connect() as conn:
        s = OrderSummary.__table__
        quiet, active = conn.execute(sa.select(sa.func.count().filter(s.c.changed_at <= past),
                                               sa.func.count().filter(s.c.changed_at > past))).one()
        assert quiet and active  # both branches are exercised at this date
        sql = base.compiled_sql(base.SegmentContext(conn, past), "lapsed_after_first_purchase")
        assert "order_summary" in sql and "FROM orders" in sql
        raw = base.compiled_sql(RawOrdersContext(conn, past), "lapsed_after_first_purchase")
        assert "order_summary" not in raw
