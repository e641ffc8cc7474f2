"""The per-member order summary (``order_summary``): its triggers, and a rebuild from scratch.

Segments and RFM scoring aggregate every member's purchases. Folding five million orders per query is
what made them 5-40x slower than DuckDB on SQLite, so the fold is kept up to date as orders are written:

* Database triggers on ``orders`` maintain it, so every writer (the importer, the generator's bulk
  load, the Hillstrom loader, tests, a future ingestion path, raw SQL) keeps it current without
  knowing it exists. An INSERT folds the new order into the member's row in O(1) (the bulk-load
  case); an UPDATE of a counted column or a DELETE recomputes the member's row from their orders
  (a refund can move the last purchase back, which no running fold can undo).
* Bulk writers (the generator, clearing a shop) turn the triggers off inside their own transaction with
  :func:`deferred_fold` and recompute the batch's members in one statement.
* :func:`rebuild` recomputes the whole table (after a restore, or to check the triggers:
  ``tests/test_order_summary.py`` asserts that incremental maintenance equals a rebuild).

The SQL lives here as text because the triggers need it as text; the migration that installs them
imports it, so the trigger bodies and :func:`rebuild` cannot drift apart. Epoch days are computed
with exactly the expression :func:`segments.sqlfn.epoch_days` uses, so arithmetic on the stored values
equals arithmetic on the aggregated timestamps bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.models import PURCHASE_STATUSES

TABLE = "order_summary"
# A bulk writer inserts a row here inside its transaction to skip the per-order fold, then folds its batch
# set-based (see :func:`deferred_fold`); invisible to other transactions, so they keep folding.
DEFERRED = "order_summary_deferred"
COLUMNS = ("member_id", "orders", "spend_minor", "first_purchase_at", "last_purchase_at",
           "first_purchase_days", "last_purchase_days", "changed_at")
_PG_FUNCTION = "membercare_order_summary"
# (name, event, WHEN condition or None, body over OLD/NEW) for SQLite; PostgreSQL uses one function.
_SQLITE_TRIGGERS = (
    ("trg_order_summary_insert", "INSERT", None, "insert"),
    ("trg_order_summary_update", "UPDATE OF member_id, placed_at, status, total_minor, updated_at", None, "NEW"),
    ("trg_order_summary_moved", "UPDATE OF member_id", "OLD.member_id <> NEW.member_id", "OLD"),
    ("trg_order_summary_delete", "DELETE", None, "OLD"),
)


def _purchase(col: str = "status") -> str:
    return f"{col} IN ({', '.join(repr(s) for s in PURCHASE_STATUSES)})"


def epoch_days_sql(dialect: str, expr: str) -> str:
    """Fractional days since 1970-01-01T00:00Z of a stored timestamp (as :func:`segments.sqlfn.epoch_days`)."""
    if dialect == "sqlite":
        return f"(julianday({expr}) - 2440587.5)"
    return f"(EXTRACT(epoch FROM {expr}) / 86400.0)"


def aggregate_sql(dialect: str, where: str) -> str:
    """``SELECT <the summary columns> FROM orders WHERE <where> GROUP BY member_id``."""
    p = _purchase()
    first, last = f"min(CASE WHEN {p} THEN placed_at END)", f"max(CASE WHEN {p} THEN placed_at END)"
    void_touched = f"max(CASE WHEN NOT ({p}) THEN updated_at END)"
    return (
        f"SELECT member_id, sum(CASE WHEN {p} THEN 1 ELSE 0 END), sum(CASE WHEN {p} THEN total_minor ELSE 0 END), "
        f"{first}, {last}, {epoch_days_sql(dialect, first)}, {epoch_days_sql(dialect, last)}, "
        f"CASE WHEN {void_touched} > max(placed_at) THEN {void_touched} ELSE max(placed_at) END "
        f"FROM orders WHERE {where} GROUP BY member_id"
    )


def _upsert(select_sql: str, set_clause: str) -> str:
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) {select_sql} ON CONFLICT (member_id) DO UPDATE SET {set_clause}"


def recompute_sql(dialect: str, where: str) -> str:
    """Upsert the recomputed rows of the members whose orders match ``where`` (rows of members left with no
    orders are not deleted by this statement)."""
    return _upsert(aggregate_sql(dialect, where), ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:]))


def refresh_member_sql(dialect: str, member: str) -> list[str]:
    """Statements recomputing one member's row (``member`` is SQL: ``OLD.member_id``, a bind, ...)."""
    return [
        recompute_sql(dialect, f"member_id = {member}"),
        f"DELETE FROM {TABLE} WHERE member_id = {member} AND NOT EXISTS "
        f"(SELECT 1 FROM orders WHERE member_id = {member})",
    ]


def fold_new_order_sql(dialect: str) -> str:
    """The INSERT trigger's statement: fold ``NEW`` into its member's row without reading other orders."""
    p = _purchase("NEW.status")
    placed = f"CASE WHEN {p} THEN NEW.placed_at END"
    values = (f"SELECT NEW.member_id, CASE WHEN {p} THEN 1 ELSE 0 END, CASE WHEN {p} THEN NEW.total_minor ELSE 0 END, "
              f"{placed}, {placed}, CASE WHEN {p} THEN {epoch_days_sql(dialect, 'NEW.placed_at')} END, "
              f"CASE WHEN {p} THEN {epoch_days_sql(dialect, 'NEW.placed_at')} END, "
              f"CASE WHEN NOT ({p}) AND NEW.updated_at > NEW.placed_at THEN NEW.updated_at ELSE NEW.placed_at END "
              "WHERE true")  # SQLite needs a WHERE to parse INSERT ... SELECT ... ON CONFLICT
    s = TABLE

    def pick(col: str, better: str, days: str) -> str:
        # The days column follows its timestamp, judged on the old values (SET sees the row before the update).
        cond = f"{s}.{col} IS NULL OR excluded.{col} {better} {s}.{col}"
        return (f"{col} = CASE WHEN {cond} THEN excluded.{col} ELSE {s}.{col} END, "
                f"{days} = CASE WHEN {cond} THEN excluded.{days} ELSE {s}.{days} END")

    return _upsert(values, ", ".join((
        f"orders = {s}.orders + excluded.orders",
        f"spend_minor = {s}.spend_minor + excluded.spend_minor",
        pick("first_purchase_at", "<", "first_purchase_days"),
        pick("last_purchase_at", ">", "last_purchase_days"),
        f"changed_at = CASE WHEN excluded.changed_at > {s}.changed_at THEN excluded.changed_at ELSE {s}.changed_at END",
    )))


def install_triggers_sql(dialect: str) -> list[str]:
    """DDL creating the maintenance triggers (used by migration 0012_order_summary)."""
    if dialect == "postgresql":
        # Lock the member's row before aggregating: under READ COMMITTED the aggregate's snapshot is then
        # taken after any concurrent writer of this member committed, so no recompute loses its change.
        # (The INSERT fold is additive on the latest row version and needs no lock; SQLite has one writer.)
        lock = "PERFORM 1 FROM order_summary WHERE member_id = {} FOR UPDATE; "
        refresh_old = lock.format("OLD.member_id") + "; ".join(refresh_member_sql(dialect, "OLD.member_id"))
        refresh_new = lock.format("NEW.member_id") + "; ".join(refresh_member_sql(dialect, "NEW.member_id"))
        return [
            f"""CREATE FUNCTION {_PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF EXISTS (SELECT 1 FROM {DEFERRED}) THEN RETURN NULL; END IF;
              IF TG_OP = 'INSERT' THEN {fold_new_order_sql(dialect)}; RETURN NULL; END IF;
              IF TG_OP = 'DELETE' THEN {refresh_old}; RETURN NULL; END IF;
              IF OLD.member_id <> NEW.member_id THEN {refresh_old}; END IF;
              {refresh_new};
              RETURN NULL;
            END $$""",
            f"CREATE TRIGGER trg_order_summary AFTER INSERT OR DELETE OR UPDATE OF member_id, placed_at, status, "
            f"total_minor, updated_at ON orders FOR EACH ROW EXECUTE FUNCTION {_PG_FUNCTION}()",
        ]
    out = []
    for name, event, cond, body in _SQLITE_TRIGGERS:
        stmts = [fold_new_order_sql(dialect)] if body == "insert" else refresh_member_sql(dialect, f"{body}.member_id")
        live = f"NOT EXISTS (SELECT 1 FROM {DEFERRED})"
        when = f" WHEN {live} AND ({cond})" if cond else f" WHEN {live}"
        out.append(f"CREATE TRIGGER {name} AFTER {event} ON orders FOR EACH ROW{when} BEGIN "
                   + "".join(f"{s}; " for s in stmts) + "END")
    return out


def drop_triggers_sql(dialect: str) -> list[str]:
    if dialect == "postgresql":
        return ["DROP TRIGGER IF EXISTS trg_order_summary ON orders", f"DROP FUNCTION IF EXISTS {_PG_FUNCTION}()"]
    return [f"DROP TRIGGER IF EXISTS {name}" for name, *_ in _SQLITE_TRIGGERS]


@contextmanager
def deferred_fold(conn: Connection, member_ids: Sequence[int]) -> Iterator[None]:
    """Write orders of ``member_ids`` in the block with the triggers off, then recompute those members at once.

    For bulk writers (the generator's load, clearing a shop): one set-based recompute instead of trigger work
    per order. Must run inside the caller's transaction (other transactions do not see the flag row and keep
    their triggers); every order changed in the block must belong to ``member_ids``' id range, or be deleted
    together with its member's summary row.
    """
    conn.execute(sa.text(f"INSERT INTO {DEFERRED} (id) VALUES (1)"))
    yield
    conn.execute(sa.text(f"DELETE FROM {DEFERRED}"))
    if member_ids:
        # A recompute is exact for any member in the range, so the range need not be only theirs.
        conn.execute(sa.text(recompute_sql(conn.dialect.name, "member_id BETWEEN :lo AND :hi")),
                     {"lo": min(member_ids), "hi": max(member_ids)})


def rebuild(conn: Connection) -> int:
    """Recompute ``order_summary`` from ``orders`` in the caller's transaction; returns the rows written.

    The triggers keep the table current; this is for repair (a restore that bypassed them) and checks.
    """
    conn.execute(sa.text(f"DELETE FROM {TABLE}"))
    conn.execute(sa.text(f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) {aggregate_sql(conn.dialect.name, 'true')}"))
    return int(conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one())


__all__ = ["COLUMNS", "DEFERRED", "TABLE", "aggregate_sql", "deferred_fold", "drop_triggers_sql", "epoch_days_sql",
           "install_triggers_sql", "rebuild", "recompute_sql", "refresh_member_sql"]
