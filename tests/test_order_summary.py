"""order_summary: the triggers' incremental maintenance equals a rebuild from scratch, on both backends."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from membercare import order_summary
from membercare.data.generator import generate_shop
from membercare.db import alembic_config, make_engine, upgrade
from membercare.models import Member, Order, OrderLine
from test_import import MEMBER_HEADER, ORDER_HEADER, imp, member_row, write_csv

COLS = ", ".join(order_summary.COLUMNS)


def _table(conn) -> list[tuple]:
    return [tuple(r) for r in conn.execute(sa.text(f"SELECT {COLS} FROM order_summary ORDER BY member_id"))]


def assert_equals_rebuild(engine) -> list[tuple]:
    """The maintained table, after checking that a rebuild from the orders writes exactly the same rows."""
    with engine.begin() as conn:
        kept = _table(conn)
        order_summary.rebuild(conn)
        assert _table(conn) == kept
        conn.rollback()
    return kept


def _line(order, member, no=1, *, amount="100", status="paid", placed="2024-05-01 12:00", sku="SKU-1", cat="tea"):
    return [order, member, placed, status, "TWD", str(no), sku, f"Product {sku}", cat, "1", amount]


def test_imports_updates_refunds_moves_and_deletes_keep_the_summary_equal_to_a_rebuild(engine, tmp_path):
    imp(engine, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(i) for i in (1, 2, 3)]))
    steps = [
        # new orders, one cancelled from the start, several per member in one batch
        [_line("O1", "M000001"), _line("O1", "M000001", 2, amount="50", sku="SKU-2"),
         _line("O2", "M000001", placed="2024-06-01 08:00", amount="300"),
         _line("O3", "M000002", placed="2024-03-01 09:30", status="cancelled"),
         _line("O4", "M000002", placed="2024-07-10 10:00", amount="20")],
        # refund of the latest purchase (last purchase moves back), amount change, a new member's first order
        [_line("O2", "M000001", placed="2024-06-01 08:00", amount="300", status="refunded"),
         _line("O4", "M000002", placed="2024-07-10 10:00", amount="25"),
         _line("O5", "M000003", placed="2024-08-01 00:00", amount="70", status="delivered")],
        # an order moves to another member; a cancelled order is reinstated; an earlier first purchase arrives
        [_line("O1", "M000003"), _line("O1", "M000003", 2, amount="50", sku="SKU-2"),
         _line("O3", "M000002", placed="2024-03-01 09:30", status="paid"),
         _line("O6", "M000001", placed="2023-12-31 23:59", amount="5")],
    ]
    for i, rows in enumerate(steps):
        imp(engine, "orders", write_csv(tmp_path / f"o{i}.csv", ORDER_HEADER, rows), batch_size=2)
        assert_equals_rebuild(engine)
    by_ext = {}
    with engine.connect() as conn:
        ext = dict(conn.execute(sa.select(Member.id, Member.external_id)).tuples().all())
        for row in _table(conn):
            by_ext[ext[row[0]]] = row[1:3]
    # M1 keeps O6 (O1 moved away, O2 refunded, but the row stays: its refunded order is still its history).
    assert by_ext == {"M000001": (1, 500), "M000002": (2, 10000 + 2500), "M000003": (2, 7000 + 15000)}
    with engine.begin() as conn:  # deleting a member's last order removes their row
        gone = sa.select(Order.id).where(Order.external_id.in_(["O2", "O6"])).scalar_subquery()
        conn.execute(sa.delete(OrderLine).where(OrderLine.order_id.in_(gone)))
        conn.execute(sa.delete(Order).where(Order.external_id.in_(["O2", "O6"])))
    rows = assert_equals_rebuild(engine)
    assert {ext[r[0]] for r in rows} == {"M000002", "M000003"}


def test_generated_shop_summary_equals_a_rebuild(engine):
    as_of = datetime(2026, 11, 23, 16, tzinfo=UTC)
    generate_shop(engine, members=200, seed=4, as_of=as_of, batch_size=120)
    # Replacing the shop (TRUNCATE on PostgreSQL, which fires no row triggers) must not leave old rows behind.
    generate_shop(engine, members=300, seed=3, as_of=as_of, batch_size=120, replace=True)
    rows = assert_equals_rebuild(engine)
    with engine.connect() as conn:
        buyers = conn.execute(sa.select(sa.func.count(sa.distinct(Order.member_id)))).scalar()
    assert len(rows) == buyers > 0


def test_migration_backfills_existing_orders(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0008_send_gate")
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(sa.text("INSERT INTO members (id, external_id, name, country, locale, timezone, joined_at, tier, "
                             "points_balance, preferred_channels, created_at, updated_at) VALUES "
                             "(1, 'M1', 'A', 'TW', 'zh-TW', 'Asia/Taipei', '2024-01-01 00:00:00.000000', 'silver', "
                             "0, 'email', '2024-01-01 00:00:00.000000', '2024-01-01 00:00:00.000000')"))
        for i, (placed, status, total) in enumerate([("2024-02-01", "paid", 100), ("2024-03-01", "refunded", 50),
                                                     ("2024-01-15", "delivered", 7)]):
            conn.execute(sa.text(
                "INSERT INTO orders (external_id, member_id, placed_at, status, total_minor, currency, updated_at) "
                f"VALUES ('O{i}', 1, '{placed} 10:00:00.000000', '{status}', {total}, 'TWD', "
                "'2024-04-01 00:00:00.000000')"))
    upgrade(url)
    rows = assert_equals_rebuild(eng)
    assert [r[:3] for r in rows] == [(1, 2, 107)]
    command.downgrade(alembic_config(url), "0008_send_gate")
    with eng.connect() as conn:
        assert not sa.inspect(conn).has_table("order_summary")
    eng.dispose()


@pytest.mark.postgres
def test_concurrent_refunds_of_one_members_orders_are_both_counted(pg_url, tmp_path):
    """Two transactions refund different orders of one member: the later recompute must see the earlier one."""
    eng = make_engine(pg_url)
    imp(eng, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(1)]))
    imp(eng, "orders", write_csv(tmp_path / "o.csv", ORDER_HEADER, [_line("A", "M000001"), _line("B", "M000001")]))
    refund = "UPDATE orders SET status = 'refunded' WHERE external_id = :x"
    first = eng.connect()
    first.begin()
    first.execute(sa.text(refund), {"x": "A"})
    pid = first.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with eng.begin() as conn:
                conn.execute(sa.text(refund), {"x": "B"})
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    t = threading.Thread(target=second)
    t.start()
    with eng.connect() as watch:  # wait (by state, not time) until the second writer is blocked behind the first
        blocked = sa.text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
        while not watch.execute(blocked, {"pid": pid}).scalar() and t.is_alive():
            watch.rollback()
    first.commit()
    first.close()
    t.join()
    assert not errors
    assert [r[1:3] for r in assert_equals_rebuild(eng)] == [(0, 0)]
    eng.dispose()
