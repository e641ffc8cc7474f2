"""The few SQL expressions that differ between SQLite and PostgreSQL.

Segment builders stay dialect-neutral by going through these helpers. Conventions:

* "epoch days" are fractional days since 1970-01-01T00:00Z: differences of them are durations in
  days, on both backends (SQLite stores UTC text, so ``julianday``; PostgreSQL ``timestamptz``, so
  ``extract(epoch ...)``). Python computes the same number for ``as_of`` with :func:`py_epoch_days`.
* "UTC day numbers" are whole days since 1970-01-01 of a timestamp's UTC calendar date.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from membercare.timeutil import UTC, ensure_utc

# A SQL expression (a column, a bound literal, a function call).
Sql = sa.ColumnElement[Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_JULIAN_EPOCH = 2440587.5  # julianday('1970-01-01T00:00')


def py_epoch_days(value: datetime) -> float:
    return (ensure_utc(value) - _EPOCH).total_seconds() / 86400.0


def py_day_number(value: date) -> int:
    return (value - _EPOCH.date()).days


def epoch_days(dialect: str, expr: Sql) -> Sql:
    if dialect == "sqlite":
        return sa.func.julianday(expr) - _JULIAN_EPOCH
    return sa.extract("epoch", expr) / 86400.0


def utc_day_number(dialect: str, expr: Sql) -> Sql:
    if dialect == "sqlite":
        return sa.cast(sa.func.julianday(sa.func.date(expr)) - _JULIAN_EPOCH, sa.Integer)
    return sa.cast(sa.func.timezone("UTC", expr), sa.Date) - sa.literal_column("DATE '1970-01-01'")


def month_day(dialect: str, date_expr: Sql) -> Sql:
    """``'MM-DD'`` of a ``date`` column."""
    if dialect == "sqlite":
        # SQLite stores a date as ISO text 'YYYY-MM-DD': the characters are the answer, no need to parse the
        # date per row as strftime() does (a third of birthday_today on 100k members).
        return sa.func.substr(date_expr, 6, 5)
    if dialect == "duckdb":  # the benchmark's reference engine (PostgreSQL-compatible apart from this)
        return sa.func.strftime(date_expr, "%m-%d")
    return sa.func.to_char(date_expr, "MM-DD")


def floor_int(dialect: str, expr: Sql) -> Sql:
    # CAST truncates toward zero on SQLite but rounds on PostgreSQL; floor() first makes both agree.
    if dialect == "sqlite":
        return sa.cast(expr, sa.Integer)  # our operands are non-negative: truncation is floor
    return sa.cast(sa.func.floor(expr), sa.Integer)


def mostly_true(dialect: str, condition: Sql, probability: float = 0.9) -> Sql:
    """Tell SQLite's planner that ``condition`` keeps most rows (``likelihood()``; no-op elsewhere).

    A time-window filter such as ``placed_at > as_of - 365 days`` otherwise makes SQLite search the
    ``placed_at`` index and then fetch each row and sort for GROUP BY member_id; scanning the covering
    ``ix_orders_member_purchase`` index in member order is about three times faster.
    """
    if dialect == "sqlite":
        return sa.func.likelihood(condition, sa.literal_column(repr(float(probability))), type_=sa.Boolean)
    return condition


def string_agg(dialect: str, expr: Sql, order_by: Sql, sep: str = ",") -> Sql:
    """Concatenate ``expr`` per group, ordered by ``order_by`` where the backend can promise it.

    SQLite before 3.44 has no ordered ``group_concat``; callers that need an order feed it from an
    ordered subquery (which SQLite honours in practice, and the values stay correct either way).
    """
    text = sa.cast(expr, sa.String)
    if dialect == "sqlite":
        return sa.func.group_concat(text, sep)
    return sa.func.string_agg(text, postgresql.aggregate_order_by(sa.literal(sep), order_by))


def literal_rows(dialect: str, columns: list[tuple[str, sa.types.TypeEngine]], rows: list[tuple]) -> sa.Subquery | None:
    """A small constant table (``SELECT ... UNION ALL SELECT ...``) usable on both backends.

    SQLite cannot name the columns of a ``VALUES`` subquery, so a UNION ALL of literal selects is the
    portable spelling. Returns ``None`` for no rows (callers then know the result is empty).
    """
    if not rows:
        return None

    def lit(v, type_):
        # PostgreSQL needs the parameter types spelled out in a UNION; on SQLite a CAST to DATETIME
        # would turn '2026-11-23 ...' into the number 2026, so the bind's own type processing is used.
        return sa.literal(v, type_) if dialect == "sqlite" else sa.cast(sa.literal(v, type_), type_)

    selects = [sa.select(*[lit(v, type_).label(name) for (name, type_), v in zip(columns, row, strict=True)])
               for row in rows]
    return (selects[0] if len(selects) == 1 else sa.union_all(*selects)).subquery()
