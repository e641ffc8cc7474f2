"""Writing generated rows: one transaction per batch of members, from a background thread.

Values arrive pre-formatted in the exact form the model types store; SQLite gets an ``executemany`` of
plain tuples, PostgreSQL a ``COPY ... FROM STDIN``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Sequence

from sqlalchemy.engine import Connection, Engine

from membercare import order_summary
from membercare.data.generator.model import SHOP_TABLES, GenerationSummary
from membercare.models import (
    Consent,
    ConsentEvent,
    Coupon,
    Device,
    Member,
    Order,
    OrderLine,
    PointsEntry,
    Product,
    TierHistory,
)

_COLUMNS: dict[str, tuple[str, ...]] = {
    "members": ("id", "external_id", "name", "email", "phone", "country", "locale", "timezone", "birthday",
                "age_group", "region", "city", "joined_at", "tier", "points_balance", "preferred_channels",
                "created_at", "updated_at", "line_user_id"),
    "products": ("id", "sku", "name", "category", "price_minor", "currency", "arrived_at", "stock", "restocked_at"),
    "consent_events": ("id", "member_id", "channel", "purpose", "granted", "source", "occurred_at", "recorded_at",
                       "detail"),
    "consents": ("id", "member_id", "channel", "purpose", "granted", "source", "changed_at"),
    "devices": ("id", "member_id", "token", "platform", "app_id", "created_at", "last_seen_at", "invalidated_at",
                "invalid_reason"),
    "orders": ("id", "external_id", "member_id", "placed_at", "status", "total_minor", "currency", "delivered_at",
               "updated_at"),
    "order_lines": ("id", "order_id", "line_no", "product_id", "sku", "category", "quantity", "amount_minor",
                    "currency"),
    "coupons": ("id", "code", "member_id", "kind", "amount_minor", "percent_off", "currency", "min_spend_minor",
                "issued_at", "expires_at", "redeemed_at", "redeemed_order_id", "campaign"),
    "tier_history": ("id", "member_id", "tier", "previous_tier", "reason", "valid_from", "valid_to", "decided_at",
                     "detail"),
    "points_ledger": ("id", "member_id", "kind", "points", "occurred_at", "expires_at", "order_id", "dedupe_key",
                      "note"),
}

# Guard against drift between the model and the column lists above.
for _model in (Member, Product, ConsentEvent, Consent, Device, Order, OrderLine, Coupon, TierHistory, PointsEntry):
    _cols = set(_model.__table__.columns.keys())
    assert set(_COLUMNS[_model.__tablename__]) == _cols, (_model.__tablename__, _cols)


class BatchWriter:
    """Writes batches in a background thread, one transaction each, at most one batch queued.

    Errors surface in the submitting thread at the next :meth:`submit` or at :meth:`close`.
    """

    def __init__(self, engine: Engine, summary: GenerationSummary):
        self.engine, self.summary = engine, summary
        self.committed_members = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="membercare-generator-writer", daemon=True)
        self._thread.start()

    def submit(self, pending: dict[str, list], members: int) -> None:
        self._raise_if_failed()
        self._queue.put((pending, members))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain: the submitter will raise and stop
            try:
                _write(self.engine, item[0], self.summary)
                self.committed_members += item[1]
            except BaseException as exc:  # noqa: BLE001 - handed to the submitting thread
                self.error = exc


def _write(engine: Engine, pending: dict[str, list], summary: GenerationSummary) -> None:
    with engine.begin() as conn:
        pg = conn.dialect.name == "postgresql"
        if pg:
            conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")  # our timestamp text is UTC
        else:
            conn.exec_driver_sql("PRAGMA cache_size = -65536")  # 64 MiB: index pages of a bulk load
        for table in SHOP_TABLES:
            rows = pending[table]
            if not rows:
                continue
            if table == "orders":
                # One set-based fold of the batch's members into order_summary, not a trigger upsert per order.
                with order_summary.deferred_fold(conn, [r[2] for r in rows]):
                    _insert_rows(conn, table, rows, pg)
            else:
                _insert_rows(conn, table, rows, pg)
            setattr(summary, table, getattr(summary, table) + len(rows))


def _insert_rows(conn: Connection, table: str, rows: list, pg: bool) -> None:
    cols = _COLUMNS[table]
    if pg:
        _copy_rows(conn, table, cols, rows)
    else:
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        conn.exec_driver_sql(sql, rows)


def _copy_rows(conn: Connection, table: str, cols: Sequence[str], rows: Iterable[tuple]) -> None:
    raw = conn.connection.driver_connection
    assert raw is not None, "a connection in a transaction holds its driver's connection"
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
