"""Dialect-aware helpers for the delivery engine's set-based statements.

Planning and dispatch work on batches of hundreds to thousands of members. Written naively, that means
``IN (...)`` lists and multi-row ``VALUES`` with one bind parameter per element. On PostgreSQL that is
slow on the *client*: psycopg rewrites every ``%(name)s`` placeholder of a statement in Python and does
not cache statements with more than 50 parameters, so a 1,000-row insert of 25 columns (25,000
placeholders) cost more time than the server took to run it, and statements whose text changes with the
batch size are never prepared. So on PostgreSQL:

* :func:`any_of` renders ``column = ANY(CAST(:values AS type[]))``: one array parameter whatever the
  batch size, a constant statement text (cached by psycopg, prepared by the server after a few runs);
* :func:`insert_returning` inserts a batch as ``INSERT ... SELECT * FROM unnest(:col1, :col2, ...)``:
  one array parameter per *column* instead of one parameter per cell, in one round trip.

SQLite keeps plain ``IN`` lists (callers chunk them under its variable limit, see :data:`CHUNK`) and
``executemany``; there the statement cost is in the engine, not in parameter handling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from membercare.db import insert_for, is_sqlite

# Elements per IN list: under SQLite's historical 999-variable limit. PostgreSQL needs no chunking for
# parameter limits (one array parameter); it is chunked only to bound memory per statement.
CHUNK = {"sqlite": 900, "postgresql": 20_000}


def chunk_size(bind: Engine | Connection) -> int:
    return CHUNK["sqlite"] if is_sqlite(bind) else CHUNK["postgresql"]


def any_of(bind: Engine | Connection, column: sa.ColumnElement, values: Iterable[Any]) -> sa.ColumnElement[bool]:
    """``column IN values`` as the dialect runs it best (see the module docstring)."""
    values = list(values)
    if is_sqlite(bind):
        return column.in_(values)
    array = postgresql.ARRAY(column.type)
    return column == sa.any_(sa.cast(sa.bindparam(None, values, type_=array), array))


def insert_returning(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], *,
                     conflict: Sequence[str], returning: str) -> list[Any]:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING RETURNING returning`` for many rows; returns the
    ``returning`` values of the rows actually inserted. Every row must have the same keys."""
    if not rows:
        return []
    cols = list(rows[0])
    if is_sqlite(conn) or any(len(r) != len(cols) for r in rows):
        stmt = insert_for(conn, table).on_conflict_do_nothing(index_elements=list(conflict)).returning(
            table.c[returning])
        return list(conn.execute(stmt, [dict(r) for r in rows]).scalars())
    arrays = []
    for c in cols:
        array = postgresql.ARRAY(table.c[c].type)
        arrays.append(sa.cast(sa.bindparam(f"col_{c}", [r[c] for r in rows], type_=array), array))
    source = sa.func.unnest(*arrays).table_valued(*cols).render_derived(name="src")
    stmt = (postgresql.insert(table).from_select(cols, sa.select(*[source.c[c] for c in cols]))
            .on_conflict_do_nothing(index_elements=list(conflict)).returning(table.c[returning]))
    return list(conn.execute(stmt).scalars())


def insert_many_sqlite(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], *,
                       conflict: Sequence[str]) -> int:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` of many rows through one DBAPI ``executemany``;
    returns how many rows were inserted. SQLite only.

    SQLAlchemy's executemany path processes every bound value through the column types one by one
    (a third of the planning process's CPU at a million rows of 25 columns). Here each column's bind
    processor is looked up once and repeated values (a batch shares its timestamps) are processed once,
    so what is stored is exactly what SQLAlchemy would store. Every row must have the same keys.
    """
    if not rows:
        return 0
    cols = list(rows[0])
    dialect = conn.dialect
    procs = [table.c[c].type._cached_bind_processor(dialect) for c in cols]
    memo: dict[tuple[int, Any], Any] = {}
    params = []
    for r in rows:
        values = []
        for i, c in enumerate(cols):
            v = r[c]
            proc = procs[i]
            if proc is not None and v is not None:
                key = (i, v)
                try:
                    v = memo[key]
                except KeyError:
                    v = memo[key] = proc(v)
                except TypeError:  # unhashable value: process it every time
                    v = proc(v)
            values.append(v)
        params.append(tuple(values))
    prep = dialect.identifier_preparer
    sql = (f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(c) for c in cols)}) "
           f"VALUES ({', '.join('?' for _ in cols)}) "
           f"ON CONFLICT ({', '.join(prep.quote(c) for c in conflict)}) DO NOTHING")
    return conn.exec_driver_sql(sql, params).rowcount


__all__ = ["CHUNK", "any_of", "chunk_size", "insert_many_sqlite", "insert_returning"]
