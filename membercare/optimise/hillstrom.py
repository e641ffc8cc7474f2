"""The Hillstrom e-mail experiment loaded as real shop rows: members, campaign messages and outcomes.

Kevin Hillstrom's MineThatData data set (64,000 customers who bought in the last twelve months, split at
random into three equal groups: a men's merchandise e-mail, a women's merchandise e-mail, no e-mail; visits,
conversions and spend tracked for two weeks) is a real randomised e-mail experiment with published
results. Loading it into the ordinary tables lets the *ordinary* campaign report (``membercare report``)
be checked against those results: the men's e-mail lifts visits by +7.66 points.

The mapping (``docs/hillstrom.md`` explains each choice):

* **members**: one per customer, ``external_id`` ``hillstrom-00001`` (the 1-based data row), country US,
  locale en, a reserved ``.invalid`` address (RFC 2606: never deliverable); ``region`` = the zip code
  area (Urban / Suburban / Rural; the file's "Surburban" spelling is corrected); ``joined_at`` = the last
  purchase for ``newbie`` customers (new in the past twelve months), 13 months before the campaign
  otherwise.
* **the past year's purchases**: one delivered order ``hillstrom-00001-history`` of ``history`` dollars at
  the last purchase, ``recency`` months (of 30 days) before the campaign, with one line per merchandise kind
  bought (``mens``, ``womens``: categories of the same name; the split of the amount between them is not in
  the data and is shown as an even split) and the purchase channel (Phone / Web / Multichannel) as the
  lines' SKU ``history-<channel>``.
* **two campaigns**, ``hillstrom_mens`` and ``hillstrom_womens``, one run each at ``sent_at``: an e-mail
  customer gets a ``sent`` e-mail row in their arm's campaign; every "No E-Mail" customer gets a holdout row
  (``variant = 'holdout'``, state ``skipped``, reason ``holdout``) in **both** campaigns, because the one
  randomised control group is the control of each e-mail arm.
* **visits** are click events (provider ``hillstrom``): an e-mail customer's visit carries their message's id
  (it shows as a click in the funnel and is a touch for attribution); a No E-Mail customer's visit is a
  site visit with no message id (``url`` = the shop, ``reason`` = site visit). The report's visit rate
  counts a member's click events of either kind in the window after the (planned) send, so both arms are
  measured the same way.
* **conversions** are paid orders ``hillstrom-00001-spend`` of ``spend`` dollars, 30 minutes after the visit.
* The data has no dates: the campaign time is ``sent_at`` (default 2008-03-03 14:00 UTC, the challenge's
  month) and each visit is placed at a fixed pseudo-random instant inside the two weeks after it, from a hash
  of the customer number, so reloading places everything identically. Report it with a 14-day window.

Money is in minor units (cents, USD). Loading streams the CSV (or the ``.zip`` holding it) in batches of
``batch_size`` customers, each batch in one transaction with ``INSERT ... ON CONFLICT DO NOTHING`` on every
table's natural key: a rerun adds nothing. Invalid rows are rejected with their line numbers and the rest
is loaded.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import insert_for, is_sqlite
from membercare.delivery.models import CampaignRun, Decision, OutboxMessage, OutboxState, RunStatus
from membercare.delivery.planner import HOLDOUT
from membercare.delivery.sqlutil import any_of, chunk_size
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import Member, Order, OrderLine, OrderStatus
from membercare.timeutil import UTC, ensure_utc

DEFAULT_SENT_AT = datetime(2008, 3, 3, 14, 0, tzinfo=UTC)
CAMPAIGNS = {"Mens E-Mail": "hillstrom_mens", "Womens E-Mail": "hillstrom_womens"}
NO_EMAIL = "No E-Mail"
PROVIDER = "hillstrom"
CURRENCY = "USD"
WINDOW = timedelta(days=14)  # the experiment tracked outcomes for two weeks
REQUIRED = ("recency", "history", "mens", "womens", "zip_code", "newbie", "channel", "segment", "visit",
            "conversion", "spend")
ZIP_AREAS = {"Urban": "Urban", "Surburban": "Suburban", "Suburban": "Suburban", "Rural": "Rural"}
PURCHASE_CHANNELS = {"Phone": "phone", "Web": "web", "Multichannel": "multichannel"}
_MONTH = timedelta(days=30)
_ORDER_AFTER_VISIT = timedelta(minutes=30)


@dataclass(frozen=True)
class Customer:
    number: int  # 1-based data row
    line: int
    recency: int
    history_minor: int
    mens: bool
    womens: bool
    zip_area: str
    newbie: bool
    purchase_channel: str
    segment: str
    visit: bool
    conversion: bool
    spend_minor: int


@dataclass
class LoadSummary:
    rows: int = 0
    loaded: int = 0  # valid customer rows (inserted now or already there)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    inserted: dict[str, int] = field(default_factory=dict)  # table -> rows added by this load
    arms: dict[str, int] = field(default_factory=dict)  # segment -> customers

    def add(self, table: str, n: int) -> None:
        self.inserted[table] = self.inserted.get(table, 0) + int(n)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and validation


@contextmanager
def _open_text(path: Path):
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".csv")]
            if not names:
                raise InputError(f"{path.name}: the zip holds no .csv file")
            with zf.open(names[0]) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
                yield text
    else:
        with path.open(encoding="utf-8", newline="") as text:
            yield text


def _flag(value: str, column: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{column} must be 0 or 1, not {value!r}")
    return value == "1"


def _cents(value: str, column: str) -> int:
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{column} is not a number: {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"{column} must be a non-negative amount, not {value!r}")
    cents = d * 100
    if cents != cents.to_integral_value():
        raise ValueError(f"{column} has more than two decimals: {value!r}")
    return int(cents)


def parse_row(values: dict[str, str], number: int, line: int) -> Customer:
    """One data row as a :class:`Customer`; ``ValueError`` names the column and value that is wrong."""
    v = {k: (values.get(k) or "").strip() for k in REQUIRED}
    try:
        recency = int(v["recency"])
    except ValueError:
        raise ValueError(f"recency must be a whole number of months, not {v['recency']!r}") from None
    if not 1 <= recency <= 12:
        raise ValueError(f"recency must be 1..12 months (every customer bought in the last year), not {recency}")
    if v["zip_code"] not in ZIP_AREAS:
        raise ValueError(f"zip_code must be Urban, Surburban or Rural, not {v['zip_code']!r}")
    if v["channel"] not in PURCHASE_CHANNELS:
        raise ValueError(f"channel must be Phone, Web or Multichannel, not {v['channel']!r}")
    if v["segment"] not in (*CAMPAIGNS, NO_EMAIL):
        raise ValueError(f"segment must be Mens E-Mail, Womens E-Mail or No E-Mail, not {v['segment']!r}")
    c = Customer(
        number=number, line=line, recency=recency, history_minor=_cents(v["history"], "history"),
        mens=_flag(v["mens"], "mens"), womens=_flag(v["womens"], "womens"), zip_area=ZIP_AREAS[v["zip_code"]],
        newbie=_flag(v["newbie"], "newbie"), purchase_channel=PURCHASE_CHANNELS[v["channel"]], segment=v["segment"],
        visit=_flag(v["visit"], "visit"), conversion=_flag(v["conversion"], "conversion"),
        spend_minor=_cents(v["spend"], "spend"),
    )
    if c.spend_minor and not c.conversion:
        raise ValueError("spend without a conversion")
    if c.conversion and not c.visit:
        # Every conversion in the published file follows a visit; the order is placed after the visit.
        raise ValueError("a conversion without a visit")
    return c


def read_customers(path: Path | str, summary: LoadSummary) -> Iterator[Customer]:
    """Stream the file's valid rows; invalid ones go to ``summary.rejected`` as (line, reason)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    with _open_text(path) as text:
        reader = csv.DictReader(text)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path.name}: not the Hillstrom file: missing column(s) {', '.join(missing)}")
        number = 0
        for values in reader:
            number += 1
            summary.rows += 1
            try:
                if None in values:
                    raise ValueError(f"{len(values[None])} more field(s) than the header")
                yield parse_row(values, number, reader.line_num)
            except ValueError as exc:
                summary.rejected.append((reader.line_num, str(exc)))


# ---------------------------------------------------------------------------------------------------------------------
# Row building


def _offset(number: int) -> timedelta:
    """A fixed pseudo-random instant in [1 min, 13 days) after the send (Knuth's multiplicative hash)."""
    span = 13 * 86_400 - 60
    return timedelta(seconds=60 + (number * 2_654_435_761) % (2**32) % span)


def external_id(number: int) -> str:
    return f"hillstrom-{number:05d}"


def message_id(campaign: str, number: int) -> str:
    return f"hs{'m' if campaign == 'hillstrom_mens' else 'w'}{number:06d}"


def _runs(conn: Connection, sent_at: datetime, occurrence: str) -> dict[str, int]:
    r = CampaignRun.__table__
    for campaign in CAMPAIGNS.values():
        conn.execute(insert_for(conn, r).on_conflict_do_nothing(index_elements=["campaign", "occurrence"]), dict(
            campaign=campaign, occurrence=occurrence, purpose="marketing", priority=0, as_of=sent_at,
            status=RunStatus.COMPLETED.value, error_budget=0.5, counts="{}", created_at=sent_at,
            started_at=sent_at, finished_at=sent_at, updated_at=sent_at))
    rows = conn.execute(sa.select(r.c.campaign, r.c.id).where(
        r.c.campaign.in_(list(CAMPAIGNS.values())), r.c.occurrence == occurrence)).all()
    return {campaign: int(run_id) for campaign, run_id in rows}


def _ts(value: datetime) -> str:
    """A timestamp as SQLAlchemy's SQLite DATETIME text in UTC (which PostgreSQL parses in a UTC session).

    Rows go to the driver pre-formatted: per-value bind processing cost more than the inserts themselves.
    """
    return ensure_utc(value).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _insert(conn: Connection, table: sa.Table, cols: tuple[str, ...], rows: list[tuple], key: tuple[str, ...]) -> int:
    """Bulk ``INSERT ... ON CONFLICT (key) DO NOTHING`` of raw tuples; returns the number of rows added.

    SQLite: one ``executemany``. PostgreSQL: ``COPY`` into a temporary table, then one
    ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``.
    """
    if not rows:
        return 0
    names, conflict = ", ".join(cols), ", ".join(key)
    if is_sqlite(conn):
        sql = (f"INSERT INTO {table.name} ({names}) VALUES ({', '.join('?' * len(cols))}) "
               f"ON CONFLICT ({conflict}) DO NOTHING")
        return int(conn.exec_driver_sql(sql, rows).rowcount)
    conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
    tmp = f"_hillstrom_{table.name}"
    conn.exec_driver_sql(f"CREATE TEMP TABLE {tmp} AS SELECT {names} FROM {table.name} WITH NO DATA")
    driver = conn.connection.driver_connection
    assert driver is not None  # a connection in use holds its psycopg connection
    with driver.cursor() as cur:
        with cur.copy(f"COPY {tmp} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    added = conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {tmp} ON CONFLICT ({conflict}) DO NOTHING").rowcount
    conn.exec_driver_sql(f"DROP TABLE {tmp}")
    return int(added)


def _ids(conn: Connection, column: sa.Column, id_column: sa.Column, keys: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    step = chunk_size(conn)
    for i in range(0, len(keys), step):
        query = sa.select(column, id_column).where(any_of(conn, column, keys[i:i + step]))
        out.update(conn.execute(query).tuples().all())
    return out


MEMBER_COLS = ("external_id", "name", "email", "country", "locale", "timezone", "region", "joined_at", "tier",
               "points_balance", "preferred_channels", "created_at", "updated_at")
ORDER_COLS = ("external_id", "member_id", "placed_at", "status", "total_minor", "currency", "delivered_at",
              "updated_at")
LINE_COLS = ("order_id", "line_no", "sku", "category", "quantity", "amount_minor", "currency")
OUTBOX_COLS = ("message_id", "run_id", "campaign", "occurrence", "member_id", "idempotency_key", "variant", "purpose",
               "priority", "channel", "fallback_channels", "state", "reason_code", "reason", "attempts",
               "transient_failures", "scheduled_at", "sent_at", "created_at", "updated_at")
EVENT_COLS = ("provider", "provider_event_id", "kind", "channel", "message_id", "member_id", "occurred_at",
              "received_at", "url", "reason", "raw")


def _load_batch(conn: Connection, batch: list[Customer], runs: dict[str, int], sent_at: datetime,
                occurrence: str, summary: LoadSummary) -> None:
    m, o, ol = Member.__table__, Order.__table__, OrderLine.__table__
    sent = _ts(sent_at)
    joined_old = _ts(sent_at - 13 * _MONTH)
    last = {r: _ts(sent_at - r * _MONTH) for r in range(1, 13)}
    summary.add("members", _insert(conn, m, MEMBER_COLS, [
        (external_id(c.number), f"Hillstrom customer {c.number}", f"customer{c.number:05d}@hillstrom.invalid", "US",
         "en", "America/New_York", c.zip_area, last[c.recency] if c.newbie else joined_old, "silver", 0, "email",
         sent, sent) for c in batch], ("external_id",)))
    ids = _ids(conn, m.c.external_id, m.c.id, [external_id(c.number) for c in batch])

    orders: list[tuple[str, int, str, str, int, str, str | None, str]] = []
    outbox: list[tuple] = []
    events: list[tuple] = []
    treated_reason, holdout_reason = "Hillstrom e-mail arm", "Hillstrom No E-Mail arm (the randomised control)"
    for c in batch:
        ext, member = external_id(c.number), ids[external_id(c.number)]
        orders.append((f"{ext}-history", member, last[c.recency], OrderStatus.DELIVERED.value, c.history_minor,
                       CURRENCY, last[c.recency], last[c.recency]))
        visit_at = sent_at + _offset(c.number)
        if c.conversion:
            at = _ts(visit_at + _ORDER_AFTER_VISIT)
            orders.append((f"{ext}-spend", member, at, OrderStatus.PAID.value, c.spend_minor, CURRENCY, None, at))
        treated = c.segment != NO_EMAIL
        for campaign in ([CAMPAIGNS[c.segment]] if treated else CAMPAIGNS.values()):
            outbox.append((
                message_id(campaign, c.number), runs[campaign], campaign, occurrence, member,
                f"{campaign}|{occurrence}|{member}", None if treated else HOLDOUT, "marketing", 0,
                "email" if treated else None, "", OutboxState.SENT.value if treated else OutboxState.SKIPPED.value,
                Decision.SENT.value if treated else Decision.HOLDOUT.value,
                treated_reason if treated else holdout_reason,
                1 if treated else 0, 0, sent, sent if treated else None, sent, sent))
        if c.visit:
            at = _ts(visit_at)
            events.append((
                PROVIDER, f"visit:{c.number}", "clicked", "email",
                message_id(CAMPAIGNS[c.segment], c.number) if treated else None, member, at, at,
                "https://shop.hillstrom.invalid/", None if treated else "site visit (no e-mail)",
                f'{{"source":"hillstrom","customer":{c.number},"visit":1}}'))
    summary.add("orders", _insert(conn, o, ORDER_COLS, orders, ("external_id",)))
    oid = _ids(conn, o.c.external_id, o.c.id, [f"{external_id(c.number)}-history" for c in batch])
    lines = []
    for c in batch:
        kinds = [k for k, on in (("mens", c.mens), ("womens", c.womens)) if on]
        share = c.history_minor // len(kinds) if kinds else 0
        for n, kind in enumerate(kinds, start=1):
            amount = share if n < len(kinds) else c.history_minor - share * (len(kinds) - 1)
            lines.append((oid[f"{external_id(c.number)}-history"], n, f"history-{c.purchase_channel}", kind, 1, amount,
                          CURRENCY))
    summary.add("order_lines", _insert(conn, ol, LINE_COLS, lines, ("order_id", "line_no")))
    summary.add("outbox_messages", _insert(conn, OutboxMessage.__table__, OUTBOX_COLS, outbox, ("message_id",)))
    summary.add("engagement_events", _insert(conn, EngagementEventRow.__table__, EVENT_COLS, events,
                                             ("provider", "provider_event_id")))


def load_hillstrom_rows(engine: Engine, path: Path | str, *, sent_at: datetime = DEFAULT_SENT_AT,
                        batch_size: int = 5_000) -> LoadSummary:
    """Load the Hillstrom file as members, campaign runs, outbox rows, engagement events and orders.

    Idempotent (natural keys, ``ON CONFLICT DO NOTHING``) and streaming (one transaction per batch). Rows
    that fail validation are skipped and listed in :attr:`LoadSummary.rejected` with their line numbers.
    """
    if batch_size < 1:
        raise InputError("batch_size must be positive")
    sent_at = ensure_utc(sent_at)
    occurrence = sent_at.date().isoformat()
    summary = LoadSummary()
    with engine.begin() as conn:
        runs = _runs(conn, sent_at, occurrence)
    batch: list[Customer] = []

    def flush() -> None:
        with engine.begin() as conn:
            _load_batch(conn, batch, runs, sent_at, occurrence, summary)
        batch.clear()

    for customer in read_customers(path, summary):
        summary.loaded += 1
        summary.arms[customer.segment] = summary.arms.get(customer.segment, 0) + 1
        batch.append(customer)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    if not is_sqlite(engine) and any(summary.inserted.values()):
        # Fresh statistics after a bulk load: without them PostgreSQL's planner picks nested loops for the
        # report's joins (attribution took 30 s instead of 0.3 s on the 64,000 customers).
        with engine.begin() as conn:
            for table in ("members", "orders", "order_lines", "outbox_messages", "engagement_events"):
                conn.exec_driver_sql(f"ANALYZE {table}")
    return summary


def report_range(sent_at: datetime = DEFAULT_SENT_AT) -> tuple[datetime, datetime]:
    """A report period that holds the campaign's send: the day of ``sent_at`` (UTC)."""
    start = ensure_utc(sent_at).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)
