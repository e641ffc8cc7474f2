"""The demo shop generator: a realistic, reproducible shop for demos, tests and benchmarks.

``generate_shop(engine, members=N, seed=S, as_of=T)`` fills a fresh database with N members and
everything the rest of the product reads: consents (history and current state), push devices, a
product catalogue, orders with lines, coupons, tiers with their history, and a points ledger.

Reproducibility
    The same ``(seed, as_of, members)`` gives byte-identical tables, ids included. Nothing reads the
    wall clock: ``as_of`` is the shop's "now" and every timestamp is generated relative to it (so
    that today's segments have members: birthdays today, coupons expiring in the next 1-3 days,
    members who joined in the last days, churn risk). Members are generated in fixed blocks of
    :data:`BLOCK` members, each with its own random generator seeded from ``(seed, block index)``;
    ids are assigned in member order. The data therefore does **not** depend on ``batch_size``,
    which only sets how many members go into one database transaction.

Statistical model (see :class:`ShopModel` for the knobs)
    Purchases follow the BG/NBD "buy till you die" story: each buyer has a Poisson purchase rate
    ``lambda ~ Gamma(r, alpha)`` (per day) and, after every purchase, drops out for good with
    probability ``p ~ Beta(a, b)``. The defaults give about five orders per member, a large share
    of one-time buyers, a tail of loyal repeaters and many members who bought regularly and then
    stopped (churned). Baskets draw categories from a per-member affinity (Dirichlet) plus
    complementary-category pairs; tiers, points and coupons are derived from the orders so that
    they are mutually consistent (tier matches trailing-12-month purchases against the ``tiers``
    table; ``points_balance`` equals the ledger sum; a redeemed coupon points at an order placed
    while it was valid).

Speed and memory
    Rows are built column-wise with numpy and written per batch of members in one transaction: an
    ``executemany`` of plain tuples on SQLite, ``COPY ... FROM STDIN`` on PostgreSQL, from a writer
    thread while the next batch is generated. Values are pre-formatted in the exact form the model
    types store (timestamps as SQLAlchemy's SQLite ``DATETIME`` text, which PostgreSQL also parses
    in a UTC session), because per-value bind processing would cost more than the inserts; the
    tests read the rows back through the models' types on both backends. At most three batches
    exist at a time (being generated, queued, being written), so a million members run in
    bounded memory. Ids are explicit; PostgreSQL's identity sequences are moved past them at the end.

Compatibility
    Byte-identical output is promised for the same code and numpy version (numpy documents that
    its distributions' streams may change between versions).

This module never touches the wall clock or global random state, and writes consent rows exactly as
:func:`membercare.consent.record_consents` would (history plus folded current state), except that
``recorded_at`` equals ``occurred_at`` (the generator "records" each statement when it happens).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time as _time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare import generator_data as D
from membercare.errors import InputError
from membercare.models import (
    PURCHASE_STATUSES,
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
from membercare.timeutil import UTC, ensure_utc

SHOP_TIMEZONE = "Asia/Taipei"
# Taipei has had no daylight saving time since 1979: a fixed offset keeps the vectorised
# local-day arithmetic exact.
_SHOP_OFFSET = 8 * 3600
DAY = 86_400
CURRENCY = "TWD"

BLOCK = 1_000
"""Members per random-generator block. Part of the data's identity: changing it changes the shop."""

# Tables the generator fills, parents first.
SHOP_TABLES: tuple[str, ...] = (
    "members", "products", "consent_events", "consents", "devices", "orders", "order_lines", "coupons",
    "tier_history", "points_ledger",
)


@dataclass(frozen=True)
class ShopModel:
    """Parameters of the generated shop. The defaults are tuned to the targets in the module doc.

    Purchase process (BG/NBD): ``lambda ~ Gamma(shape=r, rate=alpha)`` purchases per day while
    alive; dropout probability after each purchase ``p ~ Beta(a, b)``.
    """

    # Mean rate r/alpha = one purchase per month while alive; dropout mean a/(a+b) = 19 % per purchase
    # with a heavy mass near 0 (loyal members) and near 1 (one-time buyers). With the join-date mix
    # below this gives about 5.0 orders per member, ~30 % one-time buyers among buyers.
    r: float = 0.9
    alpha: float = 27.0
    a: float = 0.75
    b: float = 3.2
    never_buy_share: float = 0.12         # members who registered but never ordered
    signup_purchase_share: float = 0.55   # first order within hours of joining (signed up at checkout)
    max_orders: int = 400                 # safety cap for extreme draws
    zh_share: float = 0.75
    female_share: float = 0.56
    birthday_missing: float = 0.15
    email_missing: float = 0.04
    phone_missing: float = 0.05
    joined_years: float = 3.0
    joined_last_week_share: float = 0.02
    cancel_rate: float = 0.03
    refund_rate: float = 0.02
    # Marketing opt-in at signup, and the share of opted-in members who revoke later, per channel.
    marketing_optin: dict[str, float] = field(default_factory=lambda: {"email": 0.80, "sms": 0.62, "push": 0.72})
    marketing_revoke: dict[str, float] = field(default_factory=lambda: {"email": 0.10, "sms": 0.07, "push": 0.09})
    marketing_late_optin: float = 0.05    # of those who declined at signup, opt in later
    flash_coupon_share: float = 0.07      # members holding a coupon that expires in the next 1-3 days
    points_redeemer_share: float = 0.4


DEFAULT_MODEL = ShopModel()


@dataclass
class GenerationSummary:
    """What :func:`generate_shop` wrote: rows per table and the wall time in seconds."""

    members: int = 0
    products: int = 0
    consent_events: int = 0
    consents: int = 0
    devices: int = 0
    orders: int = 0
    order_lines: int = 0
    coupons: int = 0
    tier_history: int = 0
    points_ledger: int = 0
    seconds: float = 0.0
    seed: int = 0
    as_of: datetime | None = None

    @property
    def counts(self) -> dict[str, int]:
        """``{table: rows}`` in insertion order."""
        d = asdict(self)
        return {t: d[t] for t in SHOP_TABLES}


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def default_as_of(tz: str = SHOP_TIMEZONE, today: date | None = None) -> datetime:
    """Today 00:00 in the shop timezone, as aware UTC (the default ``as_of``)."""
    today = today or datetime.now(ZoneInfo(tz)).date()
    return datetime.combine(today, time(0), ZoneInfo(tz)).astimezone(UTC)


def generate_shop(
    engine: Engine,
    *,
    members: int,
    seed: int,
    as_of: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 5000,
    replace: bool = False,
    model: ShopModel = DEFAULT_MODEL,
) -> GenerationSummary:
    """Generate a shop of ``members`` members into ``engine``'s (migrated) database.

    ``as_of`` (aware; default today 00:00 Asia/Taipei) is the shop's "now". ``progress(done, total)``
    is called after every committed batch of members. Refuses (:class:`InputError`) when the database
    already holds shop data unless ``replace`` is set, which deletes it first (and everything that
    references it). On failure the partially written shop is removed again.
    """
    if members < 1:
        raise InputError(f"--members must be at least 1 (got {members})")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer (got {seed})")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1 (got {batch_size})")
    if as_of is None:
        as_of = default_as_of()
    try:
        as_of = ensure_utc(as_of)
    except ValueError as exc:
        raise InputError(f"as_of must be timezone-aware: {as_of!r}") from exc

    started = _time.perf_counter()
    existing = _existing_rows(engine)
    if existing and not replace:
        what = ", ".join(f"{n:,} {t}" for t, n in existing.items())
        raise InputError(f"the database already holds shop data ({what}); use --replace to delete it and generate anew")
    if existing:
        clear_shop(engine)

    summary = GenerationSummary(seed=seed, as_of=as_of)
    try:
        _generate(engine, members, seed, as_of, progress, batch_size, model, summary)
    except BaseException:
        # Leave the database as we found it (empty of shop data) rather than half a shop.
        try:
            clear_shop(engine)
        except Exception as exc:  # noqa: BLE001 - the original error is re-raised below; this one is logged
            logging.getLogger(__name__).error(
                "could not remove the partly generated shop (%s): clear it before generating again", type(exc).__name__)
        raise
    summary.seconds = _time.perf_counter() - started
    return summary


def clear_shop(engine: Engine) -> None:
    """Delete all shop data, and rows of any other table that (transitively) reference it.

    The ``tiers`` definitions and the migration state stay.
    """
    with engine.begin() as conn:
        md = sa.MetaData()
        md.reflect(bind=conn)
        doomed = {t for t in SHOP_TABLES if t in md.tables}
        grew = True
        while grew:  # every table with a foreign key into a doomed table is doomed too
            grew = False
            for t in md.tables.values():
                if t.name not in doomed and any(fk.column.table.name in doomed for fk in t.foreign_keys):
                    doomed.add(t.name)
                    grew = True
        if conn.dialect.name == "postgresql":
            names = ", ".join(f'"{n}"' for n in sorted(doomed))
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        else:
            for t in reversed(md.sorted_tables):
                if t.name in doomed:
                    conn.execute(t.delete())


def _existing_rows(engine: Engine) -> dict[str, int]:
    out = {}
    with engine.connect() as conn:
        for name in ("members", "orders", "products"):
            n = conn.execute(sa.text(f"SELECT COUNT(*) FROM {name}")).scalar_one()
            if n:
                out[name] = int(n)
    return out


# --------------------------------------------------------------------------------------------------
# Orchestration: blocks -> batches -> transactions
# --------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    seed: int
    model: ShopModel
    as_of: int                  # epoch seconds (UTC)
    today: date                 # shop-local date of as_of
    catalogue: _Catalogue
    tiers: list[dict]
    next_id: dict[str, int] = field(default_factory=lambda: {t: 1 for t in SHOP_TABLES})

    def take_ids(self, table: str, n: int) -> np.ndarray:
        start = self.next_id[table]
        self.next_id[table] = start + n
        return np.arange(start, start + n, dtype=np.int64)


_COLUMNS: dict[str, tuple[str, ...]] = {
    "members": ("id", "external_id", "name", "email", "phone", "country", "locale", "timezone", "birthday",
                "age_group", "region", "city", "joined_at", "tier", "points_balance", "preferred_channels",
                "created_at", "updated_at", "line_user_id"),
    "products": ("id", "sku", "name", "category", "price_minor", "currency"),
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


def _generate(engine, members, seed, as_of_dt, progress, batch_size, model, summary) -> None:
    with engine.connect() as conn:
        tiers = [dict(r) for r in conn.execute(sa.text("SELECT * FROM tiers ORDER BY rank")).mappings()]
    if not tiers:
        raise InputError("the tiers table is empty: run `membercare db upgrade` on a fresh database first")
    ctx = _Ctx(
        seed=seed, model=model, as_of=int(as_of_dt.timestamp()),
        today=as_of_dt.astimezone(ZoneInfo(SHOP_TIMEZONE)).date(),
        catalogue=_Catalogue.build(seed), tiers=tiers,
    )
    if progress:
        progress(0, members)
    # Generation (numpy, this thread) overlaps with the database work (a writer thread): the
    # drivers release the GIL while the database executes, so both cores are busy.
    writer = _BatchWriter(engine, summary)
    try:
        pending: dict[str, list] = {t: [] for t in SHOP_TABLES}
        pending["products"] = ctx.catalogue.rows()
        pending_members = 0
        n_blocks = -(-members // BLOCK)
        for b in range(n_blocks):
            n = min(BLOCK, members - b * BLOCK)
            for table, rows in _generate_block(ctx, b, b * BLOCK, n).items():
                pending[table].extend(rows)
            pending_members += n
            if pending_members >= batch_size or b == n_blocks - 1:
                writer.submit(pending, pending_members)
                pending_members = 0
                pending = {t: [] for t in SHOP_TABLES}
                if progress:
                    progress(writer.committed_members, members)
    finally:
        writer.close()
    if progress:
        progress(writer.committed_members, members)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for t in SHOP_TABLES:  # explicit ids were inserted: move the identity sequences past them
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) "
                    f"FROM {t}"
                )
            for t in SHOP_TABLES:
                conn.exec_driver_sql(f"ANALYZE {t}")


class _BatchWriter:
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
            cols = _COLUMNS[table]
            if pg:
                _copy_rows(conn, table, cols, rows)
            else:
                sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                conn.exec_driver_sql(sql, rows)
            setattr(summary, table, getattr(summary, table) + len(rows))


def _copy_rows(conn: Connection, table: str, cols: Sequence[str], rows: Iterable[tuple]) -> None:
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


# --------------------------------------------------------------------------------------------------
# Vectorised helpers
# --------------------------------------------------------------------------------------------------


def _fmt_ts(seconds: np.ndarray) -> list:
    """Epoch seconds -> 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's SQLite DATETIME text); -1 -> None.

    PostgreSQL reads the same text (the COPY session runs in UTC).
    """
    seconds = np.asarray(seconds, dtype=np.int64)
    text = np.datetime_as_string(seconds.astype("datetime64[s]").astype("datetime64[us]"), unit="us")
    text = np.ascontiguousarray(text, dtype="U26")
    text.view(np.uint32).reshape(-1, 26)[:, 10] = ord(" ")  # ISO 'T' -> ' ', in place
    out = text.tolist()
    if (seconds < 0).any():
        for i in np.flatnonzero(seconds < 0).tolist():
            out[i] = None
    return out


def _choice(rng: np.random.Generator, weights: Sequence[float], size: int) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return rng.choice(len(w), size=size, p=w / w.sum())


def _row_choice(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (rows sum to 1)."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), probs.shape[1] - 1)


def _seg_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def _seg_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment (segments are consecutive runs of ``counts``)."""
    cs = np.cumsum(values)
    before = np.concatenate([[0], cs])[_seg_starts(counts)]
    return cs - np.repeat(before, counts)


def _local_day_start(t: np.ndarray) -> np.ndarray:
    return (t + _SHOP_OFFSET) // DAY * DAY - _SHOP_OFFSET


# Share of shop traffic per local hour: quiet nights, a lunch bump and an evening peak.
_DIURNAL = np.array([2, 1.2, .7, .4, .3, .4, .8, 1.5, 2.5, 3, 3.2, 3.6, 4.2, 3.8, 3.3, 3.2, 3.4, 3.6, 4, 4.8,
                     5.6, 6, 5.4, 3.8])


def _time_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = _choice(rng, _DIURNAL, n)
    return hour * 3600 + rng.integers(0, 3600, n)


_BASE32 = np.frombuffer("23456789ABCDEFGHJKLMNPQRSTUVWXYZ".encode("utf-32-le"), dtype=np.uint32)


def _base32(values: np.ndarray, width: int) -> list[str]:
    """Fixed-width base-32 codes without 0/O and 1/I (codes are typed in by people)."""
    v = np.asarray(values).astype(np.int64)
    digits = (v[:, None] // (32 ** np.arange(width - 1, -1, -1, dtype=np.int64))) % 32
    return np.ascontiguousarray(_BASE32[digits]).view(f"U{width}").ravel().tolist()


def _permute(values: np.ndarray, modulus: int, salt: int) -> np.ndarray:
    """An affine bijection of [0, modulus) onto itself: distinct inputs give distinct outputs that look random."""
    mult = 2_654_435_761 % modulus  # Knuth's multiplicative constant, nudged to be coprime with the modulus
    while math.gcd(mult, modulus) != 1:
        mult += 1
    if modulus > 2**31:  # the product could overflow int64: exact Python integers
        return (values.astype(object) * mult + salt) % modulus
    return (values.astype(np.int64) * mult + salt) % modulus


# --------------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------------

_CATEGORY_CODES = {
    "skincare": "SKN", "makeup": "MKP", "haircare": "HAI", "snacks": "SNK", "tea": "TEA", "coffee": "COF",
    "kitchen": "KIT", "home": "HOM", "apparel": "APP", "baby": "BAB", "pet": "PET", "electronics accessories": "ELA",
}


@dataclass
class _Catalogue:
    categories: list[str]
    demand: np.ndarray          # relative demand per category
    complement: np.ndarray      # category index -> complementary category index
    product_id: np.ndarray      # per product, grouped by category
    category: np.ndarray
    price: np.ndarray           # minor units
    sku: list[str]
    name: list[str]
    cum: np.ndarray             # category index + within-category cumulative popularity, for searchsorted

    @classmethod
    def build(cls, seed: int) -> _Catalogue:
        rng = np.random.default_rng([seed, 0xCA7A])
        cats = list(D.CATALOGUE)
        ids, cat_idx, prices, skus, names, cum = [], [], [], [], [], []
        pid = 1
        for ci, cat in enumerate(cats):
            _, products, variants = D.CATALOGUE[cat]
            items = [(f"{p}{label}", base * f) for p, base in products for label, f in variants]
            # Popularity within a category is Zipf-like, in a seed-dependent order.
            pop = 1.0 / np.arange(1, len(items) + 1) ** 0.9
            pop = pop[rng.permutation(len(items))]
            cw = np.cumsum(pop) / pop.sum()
            cw[-1] = 1.0  # exactly: a draw for category ci must never spill into ci + 1
            cum.extend((ci + cw).tolist())
            for k, (nm, price) in enumerate(items):
                nt = max(10, int(round(price / 10.0)) * 10)
                if nt >= 200 and k % 3 == 1:
                    nt -= 1  # the occasional NT$399
                ids.append(pid)
                cat_idx.append(ci)
                prices.append(nt * 100)
                skus.append(f"{_CATEGORY_CODES[cat]}-{k + 1:03d}")
                names.append(nm)
                pid += 1
        comp = {}
        for x, y in D.COMPLEMENTS:
            comp.setdefault(x, y)
            comp.setdefault(y, x)
        cum_arr = np.array(cum)
        return cls(
            categories=cats, demand=np.array([D.CATALOGUE[c][0] for c in cats], dtype=float),
            complement=np.array([cats.index(comp[c]) for c in cats]), product_id=np.array(ids),
            category=np.array(cat_idx), price=np.array(prices, dtype=np.int64), sku=skus, name=names, cum=cum_arr,
        )

    def rows(self) -> list[tuple]:
        return [(int(i), s, n, self.categories[c], int(p), CURRENCY)
                for i, s, n, c, p in zip(self.product_id, self.sku, self.name, self.category, self.price, strict=True)]

    def pick(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        """A product index per requested category, by popularity."""
        idx = np.searchsorted(self.cum, category + rng.random(len(category)), side="right")
        return np.minimum(idx, len(self.cum) - 1)


# --------------------------------------------------------------------------------------------------
# One block of members
# --------------------------------------------------------------------------------------------------


def _generate_block(ctx: _Ctx, block: int, first: int, n: int) -> dict[str, list[tuple]]:
    rng = np.random.default_rng([ctx.seed, block])
    g = np.arange(first, first + n, dtype=np.int64)   # global member index
    member_id = g + 1
    people = _people(ctx, rng, g, block)
    joined = people["joined"]
    orders = _orders(ctx, rng, member_id, joined)
    coupons = _coupons(ctx, rng, member_id, joined, orders)
    devices = _devices(ctx, rng, member_id, joined, people["age_idx"])
    consents, events = _consents(ctx, rng, member_id, joined)
    tier, tier_rows, tier_from = _tiers(ctx, member_id, joined, orders)
    ledger_rows, balance = _points(ctx, rng, member_id, orders, tier, tier_from)

    pref = np.empty(n, dtype=object)
    for ai in range(-1, len(D.AGE_GROUPS)):
        sel = people["age_idx"] == ai
        if sel.any():
            key = None if ai < 0 else D.AGE_GROUPS[ai][0]
            picks = _choice(rng, D.CHANNEL_ORDER_WEIGHTS[key], int(sel.sum()))
            pref[sel] = np.array(D.CHANNEL_ORDERS, dtype=object)[picks]

    joined_s = _fmt_ts(joined)
    as_of_s = _fmt_ts(np.array([ctx.as_of]))[0]
    member_rows = list(zip(
        member_id.tolist(), [f"M{i:07d}" for i in member_id.tolist()], people["name"], people["email"],
        people["phone"], people["country"], people["locale"], people["timezone"], people["birthday"],
        people["age_group"], people["region"], people["city"], joined_s, tier.tolist(), balance.tolist(),
        pref.tolist(), joined_s, [as_of_s] * n, [None] * n, strict=True,
    ))
    return {
        "members": member_rows, "consent_events": events, "consents": consents, "devices": devices,
        "orders": orders["rows"], "order_lines": orders["line_rows"], "coupons": coupons,
        "tier_history": tier_rows, "points_ledger": ledger_rows,
    }


def _people(ctx: _Ctx, rng: np.random.Generator, g: np.ndarray, block: int) -> dict:
    m, n = ctx.model, len(g)
    zh = rng.random(n) < m.zh_share
    female = rng.random(n) < m.female_share
    locale = np.where(zh, "zh-TW", "en")
    country = np.empty(n, dtype=object)
    for loc, sel in (("zh-TW", zh), ("en", ~zh)):
        mix = D.COUNTRY_MIX[loc]
        country[sel] = np.array([c for c, _ in mix], dtype=object)[_choice(rng, [w for _, w in mix], int(sel.sum()))]

    # Names. English-locale members in Taiwan often pair an English given name with a Taiwanese surname.
    tw_sur = _choice(rng, [w for *_, w in D.TW_SURNAMES], n)
    en_sur = rng.integers(0, len(D.EN_SURNAMES), n)
    giv = rng.integers(0, 10_000, n)
    style = rng.integers(0, 3, n)
    tw_surname_for_en = (country == "TW") & (rng.random(n) < 0.6)
    names, given_roman, sur_roman = [], [], []
    for i in range(n):
        if zh[i]:
            given = D.TW_GIVEN_FEMALE if female[i] else D.TW_GIVEN_MALE
            gz, gr = given[giv[i] % len(given)]
            sz, sr, _ = D.TW_SURNAMES[tw_sur[i]]
            names.append(sz + gz)
            given_roman.append(gr.replace("-", "").lower())
            sur_roman.append(sr.lower())
        else:
            given = D.EN_GIVEN_FEMALE if female[i] else D.EN_GIVEN_MALE
            gn = given[giv[i] % len(given)]
            sn = D.TW_SURNAMES[tw_sur[i]][1] if tw_surname_for_en[i] else D.EN_SURNAMES[en_sur[i]]
            names.append(f"{gn} {sn}")
            given_roman.append(gn.lower())
            sur_roman.append(sn.lower())

    # E-mail: the member number as suffix makes every address unique (the prefix never ends in a digit).
    domains = [d for d, _ in D.EMAIL_DOMAINS]
    dom = _choice(rng, [w for _, w in D.EMAIL_DOMAINS], n)
    has_email = rng.random(n) >= m.email_missing
    email = []
    for i in range(n):
        if not has_email[i]:
            email.append(None)
            continue
        gr, sr, num = given_roman[i], sur_roman[i], int(g[i]) + 1
        local = (f"{gr}.{sr}{num}", f"{sr}{gr}{num}", f"{gr[0]}{sr}{num}")[style[i]]
        email.append(f"{local}@{domains[dom[i]]}")

    # Geography, timezone and phone per country.
    tz = np.empty(n, dtype=object)
    region = np.empty(n, dtype=object)
    city = np.empty(n, dtype=object)
    phone = np.empty(n, dtype=object)
    # Phone numbers are a bijection of the member index within each country's number space (so
    # they are unique for shops of up to millions of members) that looks random.
    for c in np.unique(country).tolist():
        sel = np.flatnonzero(country == c)
        k = len(sel)
        if c == "TW":
            sub = _permute(g[sel], 90_000_000, ctx.seed % 90_000_000)
            tz[sel] = SHOP_TIMEZONE
            pl = _choice(rng, [w for *_, w in D.TW_CITIES], k)
            region[sel] = [D.TW_CITIES[p][0] for p in pl]
            city[sel] = [D.TW_CITIES[p][1] for p in pl]
            phone[sel] = [f"+8869{s:08d}" for s in sub.tolist()]  # 09[0-8]x-xxx-xxx mobile range
        elif c == "US":
            sub = _permute(g[sel], 8_000_000, ctx.seed % 8_000_000)
            ar = _choice(rng, [a[-1] for a in D.US_AREAS], k)
            tz[sel] = [D.US_AREAS[a][1] for a in ar]
            region[sel] = [D.US_AREAS[a][2] for a in ar]
            city[sel] = [D.US_AREAS[a][3] for a in ar]
            phone[sel] = [f"+1{D.US_AREAS[a][0]}{200 + s // 10_000}{s % 10_000:04d}"
                          for a, s in zip(ar.tolist(), sub.tolist(), strict=True)]
        else:
            spec = D.FOREIGN_COUNTRIES[c]
            tz[sel] = spec["tz"]
            places = spec["places"]
            pl = _choice(rng, [p[-1] for p in places], k)
            region[sel] = [places[p][0] for p in pl]
            city[sel] = [places[p][1] for p in pl]
            prefixes, digits = spec["prefixes"], spec["digits"]
            space = len(prefixes) * 10**digits
            sub = _permute(g[sel], space, ctx.seed % space)
            phone[sel] = [f"+{spec['code']}{prefixes[s // 10**digits]}{s % 10**digits:0{digits}d}"
                          for s in sub.tolist()]
    phone[rng.random(n) < m.phone_missing] = None

    # Joined: growth over ~3 years (more recent members are more numerous) plus a fresh cohort of
    # the last 7 days; at a shop-local time of day with the usual traffic pattern.
    recent = rng.random(n) < m.joined_last_week_share
    older = np.ceil(m.joined_years * 365 * rng.beta(1.0, 1.5, n)).astype(np.int64) + 1
    days_ago = np.where(recent, rng.integers(1, 8, n), older)
    today_start = int(_local_day_start(np.array([ctx.as_of]))[0])
    joined = today_start - days_ago * DAY + _time_of_day(rng, n)
    joined = np.minimum(joined, ctx.as_of - 60)

    # Birthdays: age group first, then a day of a non-leap year; the birth year makes the age exact.
    has_bd = rng.random(n) >= m.birthday_missing
    ag = _choice(rng, [a[-1] for a in D.AGE_GROUPS], n)
    lo = np.array([a[1] for a in D.AGE_GROUPS])[ag]
    hi = np.array([a[2] for a in D.AGE_GROUPS])[ag]
    age = rng.integers(lo, hi + 1)
    doy = rng.integers(0, 365, n)
    md = (np.datetime64("2001-01-01") + doy.astype("timedelta64[D]")).astype(object)
    month = np.array([d.month for d in md])
    day = np.array([d.day for d in md])
    today = ctx.today
    bd_idx = np.flatnonzero(has_bd)
    if len(bd_idx):
        # At least one "birthday today" per block: today's segments are never empty in a demo.
        k = bd_idx[rng.integers(0, len(bd_idx))]
        month[k], day[k] = today.month, today.day
        # Feb 29 at the natural rate (1 in 1461 birthdays), spread evenly over blocks so that every
        # shop of a few thousand members has some.
        q = BLOCK * (1 - m.birthday_missing) / 1461
        if int((block + 1) * q + 0.5) > int(block * q + 0.5):
            others = bd_idx[bd_idx != k] if len(bd_idx) > 1 else bd_idx
            j = others[rng.integers(0, len(others))]
            month[j], day[j] = 2, 29
    after_today = (month * 100 + day) > (today.month * 100 + today.day)
    year = today.year - age - after_today
    leap = (month == 2) & (day == 29)
    year = np.where(leap, year - (year % 4), year)  # nearest earlier leap year (1904..2096 rule is enough)
    birthday = [None] * n
    age_group = [None] * n
    age_idx = np.full(n, -1)
    bounds = [(a[1], a[2]) for a in D.AGE_GROUPS]
    for i in bd_idx.tolist():
        y, mo, dd = int(year[i]), int(month[i]), int(day[i])
        birthday[i] = f"{y:04d}-{mo:02d}-{dd:02d}"
        real_age = today.year - y - ((mo, dd) > (today.month, today.day))
        a_i = next((k for k, (a0, a1) in enumerate(bounds) if a0 <= real_age <= a1), len(bounds) - 1)
        age_idx[i] = a_i
        age_group[i] = D.AGE_GROUPS[a_i][0]
    return dict(name=names, email=email, phone=phone.tolist(), country=country.tolist(), locale=locale.tolist(),
                timezone=tz.tolist(), birthday=birthday, age_group=age_group, age_idx=age_idx,
                region=region.tolist(), city=city.tolist(), joined=joined)


def _orders(ctx: _Ctx, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray) -> dict:
    """BG/NBD purchase histories, statuses and basket lines."""
    m, n, as_of = ctx.model, len(member_id), ctx.as_of
    # First purchase: at signup (checkout registration) or some days later; some never buy.
    at_signup = rng.random(n) < m.signup_purchase_share
    delay = np.where(at_signup, rng.integers(120, 3 * 3600, n), (rng.exponential(25.0, n) * DAY).astype(np.int64))
    first = joined + delay
    buyer = (rng.random(n) >= m.never_buy_share) & (first < as_of - 60)

    lam = rng.gamma(m.r, 1.0 / m.alpha, n)               # purchases per day while alive
    p = rng.beta(m.a, m.b, n)                            # dropout probability after each purchase
    span = np.maximum(as_of - first, 0) / DAY            # days from the first purchase to now
    alive_repeats = rng.geometric(np.clip(p, 1e-6, 1)) - 1   # repeats before dropping out
    arrivals = rng.poisson(lam * span)                   # repeats the rate allows by now
    repeats = np.where(buyer, np.minimum(np.minimum(alive_repeats, arrivals), m.max_orders - 1), 0)

    # Repeat times: the first k of M uniform arrival times on [first, now], via exponential spacings
    # (the k smallest of M sorted uniforms are C_j / (C_k + Gamma(M + 1 - k)), C = cumulative Exp(1)).
    total_rep = int(repeats.sum())
    e = rng.exponential(1.0, total_rep)
    c = _seg_cumsum(e, repeats)
    rep_owner = np.repeat(np.arange(n), repeats)
    c_last = np.bincount(rep_owner, weights=e, minlength=n)
    rest = rng.gamma(np.maximum(arrivals - repeats + 1, 1).astype(float))
    frac = c / (c_last + rest)[rep_owner]
    rep_t = first[rep_owner] + (frac * span[rep_owner] * DAY).astype(np.int64)
    # Repeat orders happen at the shop's busy hours, not uniformly round the clock.
    rep_t = _local_day_start(rep_t) + _time_of_day(rng, total_rep)

    owner = np.concatenate([np.flatnonzero(buyer), rep_owner])
    t = np.concatenate([first[buyer], rep_t])
    t = np.clip(t, joined[owner] + 60, as_of - 1)
    order = np.lexsort((t, owner))
    owner, t = owner[order], t[order]
    k = len(owner)

    # Status by age relative to now, with a few cancellations and refunds.
    age_d = (as_of - t) / DAY
    u = rng.random(k)
    status = np.full(k, "delivered", dtype=object)
    status[age_d < 5] = np.where(rng.random(int((age_d < 5).sum())) < 0.5, "shipped", "delivered")
    status[age_d < 2] = np.where(rng.random(int((age_d < 2).sum())) < 0.6, "shipped", "paid")
    status[age_d < 0.5] = np.where(rng.random(int((age_d < 0.5).sum())) < 0.3, "placed", "paid")
    cancelled = u < m.cancel_rate
    refunded = (~cancelled) & (u < m.cancel_rate + m.refund_rate) & (age_d > 7)
    status[cancelled] = "cancelled"
    status[refunded] = "refunded"
    delivered_at = np.full(k, -1, dtype=np.int64)
    dsel = (status == "delivered") | (status == "refunded")
    # Delivery 1-4 days after the order, and for recent orders some time before now.
    lag = np.minimum(rng.uniform(1.2, 4.0, k) * DAY, (as_of - t) * rng.uniform(0.5, 0.95, k)).astype(np.int64)
    delivered_at[dsel] = t[dsel] + lag[dsel]
    updated = t.copy()
    updated[dsel] = delivered_at[dsel]
    updated[status == "refunded"] = np.minimum(delivered_at + (rng.uniform(2, 10, k) * DAY).astype(np.int64),
                                               as_of - 1)[status == "refunded"]
    updated[cancelled] = np.minimum(t + rng.integers(300, DAY, k), as_of - 1)[cancelled]
    updated[status == "shipped"] = np.minimum(t + rng.integers(4 * 3600, 2 * DAY, k), as_of - 1)[status == "shipped"]
    updated[status == "paid"] = np.minimum(t + rng.integers(10, 600, k), as_of - 1)[status == "paid"]

    # Baskets: categories from the member's affinity, the complement of the first line, products by popularity.
    cat = ctx.catalogue
    affinity = rng.dirichlet(0.8 * cat.demand / cat.demand.mean(), n)
    n_lines = 1 + np.minimum(rng.poisson(0.75, k), 5)
    line_order = np.repeat(np.arange(k), n_lines)
    line_no = np.arange(len(line_order)) - np.repeat(_seg_starts(n_lines), n_lines) + 1
    line_cat = _row_choice(rng, affinity[owner[line_order]])
    first_cat = line_cat[_seg_starts(n_lines)][line_order]
    comp = (line_no > 1) & (rng.random(len(line_order)) < 0.35)
    line_cat[comp] = cat.complement[first_cat[comp]]
    prod = cat.pick(rng, line_cat)
    qty = 1 + _choice(rng, [75, 17, 5, 1.5, 1, 0.5], len(line_order))
    amount = cat.price[prod] * qty
    total = np.bincount(line_order, weights=amount, minlength=k).astype(np.int64)

    order_id = ctx.take_ids("orders", k)
    line_id = ctx.take_ids("order_lines", len(line_order))
    t_s, d_s, u_s = _fmt_ts(t), _fmt_ts(delivered_at), _fmt_ts(updated)
    mids = member_id[owner].tolist()
    rows = list(zip(order_id.tolist(), [f"SO{i:010d}" for i in order_id.tolist()], mids, t_s, status.tolist(),
                    total.tolist(), [CURRENCY] * k, d_s, u_s, strict=True))
    lo = order_id[line_order].tolist()
    sku = [cat.sku[i] for i in prod.tolist()]
    catname = [cat.categories[c] for c in cat.category[prod].tolist()]
    line_rows = list(zip(line_id.tolist(), lo, line_no.tolist(), cat.product_id[prod].tolist(), sku, catname,
                         qty.tolist(), amount.tolist(), [CURRENCY] * len(line_order), strict=True))
    return dict(rows=rows, line_rows=line_rows, owner=owner, t=t, status=status, total=total, id=order_id)


def _coupons(ctx: _Ctx, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray, orders: dict) -> list:
    """Welcome coupons, campaign coupons over the years, and a flash campaign expiring in 1-3 days."""
    m, n, as_of = ctx.model, len(member_id), ctx.as_of
    today_start = int(_local_day_start(np.array([as_of]))[0])
    parts = []
    # Welcome: NT$100 off the first order, valid 30 days.
    w = np.flatnonzero(rng.random(n) < 0.92)
    parts.append(dict(owner=w, issued=joined[w] + 30, valid=np.full(len(w), 30 * DAY), kind=np.zeros(len(w), int),
                      value=np.full(len(w), 10_000), min_spend=np.zeros(len(w), np.int64), camp=np.zeros(len(w), int),
                      p_redeem=np.full(len(w), 0.55)))
    # Campaign coupons, about one a year per member, valid 14-30 days.
    tenure = (as_of - joined) / (365 * DAY)
    cnt = rng.poisson(1.0 * tenure)
    o = np.repeat(np.arange(n), cnt)
    k = len(o)
    issued = joined[o] + (rng.random(k) * (as_of - joined[o])).astype(np.int64)
    kind = (rng.random(k) < 0.4).astype(int)  # 1 = percent
    value = np.where(kind == 1, rng.choice([10, 15, 20], k), rng.choice([5_000, 10_000, 15_000, 20_000, 30_000], k))
    min_spend = np.where(kind == 1, 0, value * rng.choice([5, 8, 10], k))
    parts.append(dict(owner=o, issued=issued, valid=rng.choice([14, 21, 30], k) * DAY, kind=kind, value=value,
                      min_spend=min_spend, camp=np.ones(k, int), p_redeem=np.full(k, 0.35)))
    # Flash sale: issued 4-10 days ago, expires at the end of the shop day today, tomorrow or the day after.
    f = np.flatnonzero((rng.random(n) < m.flash_coupon_share) & (joined < as_of - 11 * DAY))
    kf = len(f)
    f_issued = today_start - rng.integers(4, 11, kf) * DAY + rng.integers(9 * 3600, 12 * 3600, kf)
    f_expires = today_start + rng.integers(1, 4, kf) * DAY - 1
    parts.append(dict(owner=f, issued=f_issued, valid=f_expires - f_issued, kind=np.ones(kf, int),
                      value=np.full(kf, 15), min_spend=np.zeros(kf, np.int64), camp=np.full(kf, 2),
                      p_redeem=np.full(kf, 0.3)))
    c = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    c["expires"] = c["issued"] + c["valid"]
    srt = np.lexsort((c["issued"], c["owner"]))
    c = {key: v[srt] for key, v in c.items()}
    kc = len(c["owner"])

    # Redemption: the member's first purchase placed while the coupon was valid and meeting the minimum.
    o_owner, o_t, o_status, o_total = orders["owner"], orders["t"], orders["status"], orders["total"]
    purchase = (o_status != "cancelled") & (o_status != "refunded") & (o_status != "placed")
    key = o_owner.astype(np.int64) * (1 << 40) + (o_t - ctx.as_of + (1 << 39))
    pos = np.searchsorted(key, c["owner"].astype(np.int64) * (1 << 40) + (c["issued"] - ctx.as_of + (1 << 39)))
    ok = pos < len(key)
    pos_c = np.minimum(pos, max(len(key) - 1, 0))
    if len(key):
        ok &= (o_owner[pos_c] == c["owner"]) & (o_t[pos_c] < c["expires"]) & (o_t[pos_c] < as_of)
        ok &= purchase[pos_c] & (o_total[pos_c] >= c["min_spend"])
    else:
        ok[:] = False
    ok &= rng.random(kc) < c["p_redeem"]
    # One coupon per order: the earliest issued keeps it.
    red = np.flatnonzero(ok)
    _, first_use = np.unique(pos_c[red], return_index=True)
    keep = np.zeros(kc, bool)
    keep[red[first_use]] = True
    redeemed_order = np.where(keep, orders["id"][pos_c] if len(key) else -1, -1)
    redeemed_at = np.where(keep, o_t[pos_c] if len(key) else -1, -1)

    ids = ctx.take_ids("coupons", kc)
    prefix = np.array(["WELCOME", "SALE", "FLASH"])[c["camp"]]
    codes = _base32(_permute(ids, 32**7, (ctx.seed * 104_729) % 32**7), 7)
    issued_local = (c["issued"] + _SHOP_OFFSET).astype("datetime64[s]").astype(object)
    campaign = []
    for cp, d in zip(c["camp"].tolist(), issued_local, strict=True):
        if cp == 0:
            campaign.append("welcome")
        elif cp == 2:
            campaign.append(f"flash-{d:%Y%m%d}")
        elif d.month == 11:
            campaign.append(f"double-11-{d:%Y}")
        elif d.month in (6, 7):
            campaign.append(f"mid-year-sale-{d:%Y}")
        else:
            campaign.append(f"member-day-{d:%Y%m}")
    is_pct = c["kind"] == 1
    return list(zip(
        ids.tolist(), [f"{p}-{code}" for p, code in zip(prefix.tolist(), codes, strict=True)],
        member_id[c["owner"]].tolist(),
        np.where(is_pct, "percent", "amount").tolist(),
        [None if pc else int(v) for pc, v in zip(is_pct.tolist(), c["value"].tolist(), strict=True)],
        [int(v) if pc else None for pc, v in zip(is_pct.tolist(), c["value"].tolist(), strict=True)],
        [CURRENCY] * kc, c["min_spend"].astype(np.int64).tolist(), _fmt_ts(c["issued"]), _fmt_ts(c["expires"]),
        _fmt_ts(redeemed_at), [None if x < 0 else x for x in redeemed_order.tolist()], campaign, strict=True,
    ))


def _devices(ctx: _Ctx, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray,
             age_idx: np.ndarray) -> list:
    """App installs: younger members more often; some stale, some invalidated by the push provider."""
    n, as_of = len(member_id), ctx.as_of
    p_app = np.array([0.72, 0.66, 0.55, 0.42, 0.32, 0.22, 0.45])[age_idx]  # index -1 = unknown age
    cnt = np.where(rng.random(n) < p_app, 1 + (rng.random(n) < 0.18), 0)
    o = np.repeat(np.arange(n), cnt)
    k = len(o)
    created = joined[o] + (rng.random(k) * 0.5 * (as_of - joined[o])).astype(np.int64)
    state = _choice(rng, [65, 22, 13], k)  # active, stale, invalidated
    recent = as_of - (rng.exponential(3.0, k) * DAY).astype(np.int64)
    stale = as_of - rng.integers(90, 400, k) * DAY
    last_seen = np.where(state == 0, recent, stale)
    last_seen = np.clip(last_seen, created, as_of - 1)
    inval = np.where(state == 2, np.minimum(last_seen + rng.integers(1, 60, k) * DAY, as_of - 1), -1)
    reasons = np.array(["unregistered", "invalid_argument", "sender_id_mismatch"], dtype=object)
    reason = reasons[_choice(rng, [85, 10, 5], k)]
    android = rng.random(k) < 0.58
    ids = ctx.take_ids("devices", k)
    # FCM-shaped registration tokens: an instance-id part, ':APA91b', then random URL-safe base64.
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)
    body = alphabet[rng.integers(0, 64, (k, 134))].tobytes().decode()
    inst = _base32(_permute(ids, 32**11, (ctx.seed * 15_485_863) % 32**11), 11)
    tokens = [f"{inst[i]}:APA91b{body[i * 134:(i + 1) * 134]}" for i in range(k)]
    return list(zip(
        ids.tolist(), member_id[o].tolist(), tokens, np.where(android, "android", "ios").tolist(),
        np.where(android, "tw.example.shop", "com.example.shop.ios").tolist(), _fmt_ts(created), _fmt_ts(last_seen),
        _fmt_ts(inval), [r if s == 2 else None for r, s in zip(reason.tolist(), state.tolist(), strict=True)],
        strict=True,
    ))


_CHANNELS = ("email", "sms", "push")
_REVOKE_SOURCES = {
    "email": (("unsubscribe_link", 70), ("list_unsubscribe", 25), ("complaint", 5)),
    "sms": (("sms_stop", 90), ("preference_center", 10)),
    "push": (("preference_center", 100),),
}


def _consents(ctx: _Ctx, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray) -> tuple[list, list]:
    """Consent history (1-2 statements per channel x purpose) and the current state folded from it.

    Transactional messages are always granted at signup; marketing is opted into per channel at
    signup, and some members change their mind later (a second statement).
    """
    m, n, as_of = ctx.model, len(member_id), ctx.as_of
    joined_s = _fmt_ts(joined)
    # Per member and channel: initial marketing choice, whether it changes, and when.
    init = {c: rng.random(n) < m.marketing_optin[c] for c in _CHANNELS}
    change = {}
    when = {}
    src = {}
    for c in _CHANNELS:
        u = rng.random(n)
        change[c] = np.where(init[c], u < m.marketing_revoke[c], u < m.marketing_late_optin) & (joined < as_of - 3600)
        when[c] = joined + 60 + (rng.random(n) * np.maximum(as_of - joined - 120, 1)).astype(np.int64)
        names = [s for s, _ in _REVOKE_SOURCES[c]]
        src[c] = np.array(names, dtype=object)[_choice(rng, [w for _, w in _REVOKE_SOURCES[c]], n)]
    when_s = {c: _fmt_ts(when[c]) for c in _CHANNELS}

    events, current = [], []
    for i in range(n):
        mid = int(member_id[i])
        for c in _CHANNELS:
            # The history: (purpose, granted, source, occurred) in time order per key.
            events.append((mid, c, "transactional", True, "signup_form", joined_s[i], joined_s[i], None))
            current.append((mid, c, "transactional", True, "signup_form", joined_s[i]))
            g0 = bool(init[c][i])
            events.append((mid, c, "marketing", g0, "signup_form", joined_s[i], joined_s[i], None))
            if change[c][i]:
                s = src[c][i] if g0 else "preference_center"
                events.append((mid, c, "marketing", not g0, s, when_s[c][i], when_s[c][i], None))
                current.append((mid, c, "marketing", not g0, s, when_s[c][i]))
            else:
                current.append((mid, c, "marketing", g0, "signup_form", joined_s[i]))
    ev_ids = ctx.take_ids("consent_events", len(events)).tolist()
    cur_ids = ctx.take_ids("consents", len(current)).tolist()
    return ([(i, *r) for i, r in zip(cur_ids, current, strict=True)],
            [(i, *r) for i, r in zip(ev_ids, events, strict=True)])


def _qualifies(tier: dict, spend: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A tier's upgrade bar: spend OR order count over the window (a zero bar is no bar, unless both are)."""
    s, o = int(tier["upgrade_spend_minor"]), int(tier["upgrade_orders"])
    if s <= 0 and o <= 0:
        return np.ones(len(spend), bool)
    q = np.zeros(len(spend), bool)
    if s > 0:
        q |= spend >= s
    if o > 0:
        q |= count >= o
    return q


def _tiers(ctx: _Ctx, member_id: np.ndarray, joined: np.ndarray, orders: dict) -> tuple[np.ndarray, list, np.ndarray]:
    """Current tier from trailing-window purchases, and one ``initial`` tier_history row per member.

    ``valid_from`` is the moment the member first met the bar within the current window (for the
    entry tier: joining), so "tier at time t" queries agree with the orders.
    """
    n, as_of = len(member_id), ctx.as_of
    owner, t, status, total = orders["owner"], orders["t"], orders["status"], orders["total"]
    purchase = np.isin(status, PURCHASE_STATUSES)
    tier_idx = np.zeros(n, dtype=np.int64)
    valid_from = joined.copy()
    spend12 = np.zeros(n, np.int64)
    count12 = np.zeros(n, np.int64)
    for rank, tier in enumerate(ctx.tiers):
        if rank == 0:
            continue
        win = purchase & (t > as_of - int(tier["window_days"]) * DAY)
        o, tt, amt = owner[win], t[win], total[win]
        counts = np.bincount(o, minlength=n)
        spend = np.bincount(o, weights=amt, minlength=n).astype(np.int64)
        if rank == 1:
            spend12, count12 = spend, counts
        q = _qualifies(tier, spend, counts)
        if not q.any():
            continue
        # Running totals within the window (orders are sorted by member, time) -> first qualifying order.
        cum_spend = _seg_cumsum(amt, counts)
        cum_count = _seg_cumsum(np.ones(len(o), np.int64), counts)
        hit = _qualifies(tier, cum_spend, cum_count)
        hit_pos = np.flatnonzero(hit)
        first_hit = np.full(n, -1)
        if len(hit_pos):
            mem, idx = np.unique(o[hit_pos], return_index=True)
            first_hit[mem] = tt[hit_pos[idx]]
        sel = q & (first_hit >= 0)
        tier_idx[sel] = rank
        valid_from[sel] = first_hit[sel]
    codes = np.array([tr["code"] for tr in ctx.tiers], dtype=object)[tier_idx]
    ids = ctx.take_ids("tier_history", n)
    vf = _fmt_ts(valid_from)
    detail = [f"generated: trailing 12-month purchases {c} orders, {s // 100:,} {CURRENCY}"
              for c, s in zip(count12.tolist(), spend12.tolist(), strict=True)]
    rows = list(zip(ids.tolist(), member_id.tolist(), codes.tolist(), [None] * n, ["initial"] * n, vf, [None] * n, vf,
                    detail, strict=True))
    return codes, rows, valid_from


def _points(ctx: _Ctx, rng: np.random.Generator, member_id: np.ndarray, orders: dict, tier: np.ndarray,
            tier_from: np.ndarray) -> tuple[list, np.ndarray]:
    """Points ledger: earned per paid order at the tier's rate; redeemers spend, the others let points expire.

    The two behaviours are kept apart so that the balance never dips below zero at any point in time.
    """
    n, as_of = len(member_id), ctx.as_of
    rates = {tr["code"]: int(tr["points_per_100"]) for tr in ctx.tiers}
    entry_rate = int(ctx.tiers[0]["points_per_100"])
    member_rate = np.array([rates[c] for c in tier.tolist()], dtype=np.int64)
    owner, t, status, total, oid = orders["owner"], orders["t"], orders["status"], orders["total"], orders["id"]
    earns = np.isin(status, ["paid", "shipped", "delivered"])
    rate = np.where(t >= tier_from[owner], member_rate[owner], entry_rate)
    pts = (total // 10_000) * rate  # total is in hundredths: per NT$100 spent
    earns &= pts > 0
    e_owner, e_t, e_pts, e_oid = owner[earns], t[earns], pts[earns], oid[earns]
    e_exp = e_t + 365 * DAY
    redeemer = rng.random(n) < ctx.model.points_redeemer_share

    # Redeemers spend part of what they had at their latest earning order.
    e_counts = np.bincount(e_owner, minlength=n)
    last_pos = _seg_starts(e_counts) + e_counts - 1
    before = _seg_cumsum(e_pts, e_counts) - e_pts  # earned before each entry
    spenders = np.flatnonzero(redeemer & (e_counts >= 2))
    sp_pos = last_pos[spenders]
    sp_pts = (before[sp_pos] * rng.uniform(0.5, 1.0, len(spenders))).astype(np.int64) // 10 * 10
    keep = sp_pts > 0
    spenders, sp_pos, sp_pts = spenders[keep], sp_pos[keep], sp_pts[keep]
    # Everyone else lets points lapse after a year.
    exp_sel = ~redeemer[e_owner] & (e_exp <= as_of)

    # Assemble per member in time order: spend before the same order's earning.
    kinds = np.concatenate([np.zeros(len(e_owner), int), np.ones(len(spenders), int), np.full(int(exp_sel.sum()), 2)])
    own = np.concatenate([e_owner, spenders, e_owner[exp_sel]])
    when = np.concatenate([e_t, e_t[sp_pos], e_exp[exp_sel]])
    points = np.concatenate([e_pts, -sp_pts, -e_pts[exp_sel]])
    order_ref = np.concatenate([e_oid, e_oid[sp_pos], np.full(int(exp_sel.sum()), -1)])
    src_entry = np.concatenate([np.full(len(e_owner), -1), np.full(len(spenders), -1), np.flatnonzero(exp_sel)])
    # Per member in time order; at the same instant a checkout's spend comes before its earning.
    srt = np.lexsort((np.where(kinds == 1, -1, kinds), when, own))
    kinds, own, when, points, order_ref, src_entry = (a[srt] for a in (kinds, own, when, points, order_ref, src_entry))
    ids = ctx.take_ids("points_ledger", len(kinds))
    # Ledger id of every earned entry (the expiry rows name it in their dedupe key). The earned rows
    # were concatenated first, so their pre-sort position is their index in e_*.
    pos_of_earn = np.empty(len(e_owner), dtype=np.int64)
    inv = np.flatnonzero(kinds == 0)
    pos_of_earn[srt[inv]] = inv
    earned_id = ids[pos_of_earn]
    kind_names = np.array(["earned", "spent", "expired"], dtype=object)[kinds]
    dedupe, notes, expires = [], [], np.full(len(kinds), -1, dtype=np.int64)
    expires[kinds == 0] = when[kinds == 0] + 365 * DAY
    for kd, ref, se in zip(kinds.tolist(), order_ref.tolist(), src_entry.tolist(), strict=True):
        if kd == 0:
            dedupe.append(f"order:{ref}:earned")
            notes.append(None)
        elif kd == 1:
            dedupe.append(f"order:{ref}:spent")
            notes.append("redeemed at checkout")
        else:
            eid = int(earned_id[se])
            dedupe.append(f"points:{eid}:expired")
            notes.append(f"expiry of ledger entry {eid}")
    balance = np.bincount(own, weights=points, minlength=n).astype(np.int64)
    rows = list(zip(ids.tolist(), member_id[own].tolist(), kind_names.tolist(), points.tolist(), _fmt_ts(when),
                    _fmt_ts(expires), [None if r < 0 else r for r in order_ref.tolist()], dedupe, notes, strict=True))
    return rows, balance
