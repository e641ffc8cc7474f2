"""``db.in_transaction``: a PostgreSQL deadlock victim is run again from the start; other errors are not."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from membercare.db import in_transaction, is_retryable, make_engine


@pytest.mark.postgres
def test_two_writers_locking_rows_in_opposite_orders_both_finish(pg_url):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t_lock (id int PRIMARY KEY, n int NOT NULL)")
        conn.exec_driver_sql("INSERT INTO t_lock VALUES (1, 0), (2, 0)")
    barrier = threading.Barrier(2, timeout=10)
    tries = {1: 0, 2: 0}
    errors: list[BaseException] = []

    def writer(first: int, second: int):
        def work(conn):
            tries[first] += 1
            conn.exec_driver_sql(f"UPDATE t_lock SET n = n + 1 WHERE id = {first}")
            if tries[first] == 1:
                barrier.wait()  # both hold their first row: the second updates deadlock
            conn.exec_driver_sql(f"UPDATE t_lock SET n = n + 1 WHERE id = {second}")
        try:
            in_transaction(engine, work)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(1, 2)), threading.Thread(target=writer, args=(2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(tries.values()) == [1, 2]  # exactly one victim, run again once
    with engine.connect() as conn:
        assert dict(conn.exec_driver_sql("SELECT id, n FROM t_lock").all()) == {1: 2, 2: 2}  # nothing twice
    engine.dispose()


def test_other_errors_are_raised_at_once(sqlite_engine):
    calls = []

    def work(conn):
        calls.append(1)
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    with pytest.raises(sa.exc.OperationalError) as err:
        in_transaction(sqlite_engine, work)
    assert calls == [1] and not is_retryable(err.value)
