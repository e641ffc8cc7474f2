"""Generating, refusing and clearing a shop: :func:`generate_shop`, :func:`clear_shop`, :func:`default_as_of`.

Members are generated block by block (:data:`~.model.BLOCK` members per random generator, see the package
documentation) and handed to the :class:`~.writer.BatchWriter` per batch."""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Callable
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare import order_summary
from membercare.data.generator import reference as D
from membercare.data.generator.arrays import choice, fmt_ts
from membercare.data.generator.catalogue import Catalogue
from membercare.data.generator.contact import make_consents, make_devices
from membercare.data.generator.loyalty import make_points, make_tiers
from membercare.data.generator.model import (
    BLOCK,
    DEFAULT_MODEL,
    SHOP_TABLES,
    SHOP_TIMEZONE,
    Context,
    GenerationSummary,
    ShopModel,
)
from membercare.data.generator.people import make_people
from membercare.data.generator.purchases import make_coupons, make_orders
from membercare.data.generator.writer import BatchWriter
from membercare.errors import InputError
from membercare.timeutil import UTC, ensure_utc


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
            # order_summary is doomed with members: no per-order trigger work for orders deleted anyway.
            with order_summary.deferred_fold(conn, []):
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


def _generate(engine, members, seed, as_of_dt, progress, batch_size, model, summary) -> None:
    with engine.connect() as conn:
        tiers = [dict(r) for r in conn.execute(sa.text("SELECT * FROM tiers ORDER BY rank")).mappings()]
    if not tiers:
        raise InputError("the tiers table is empty: run `membercare db upgrade` on a fresh database first")
    ctx = Context(
        seed=seed, model=model, as_of=int(as_of_dt.timestamp()),
        today=as_of_dt.astimezone(ZoneInfo(SHOP_TIMEZONE)).date(),
        catalogue=Catalogue.build(seed, int(as_of_dt.timestamp())), tiers=tiers,
    )
    if progress:
        progress(0, members)
    # Generation (numpy, this thread) overlaps with the database work (a writer thread): the
    # drivers release the GIL while the database executes, so both cores are busy.
    writer = BatchWriter(engine, summary)
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


def _generate_block(ctx: Context, block: int, first: int, n: int) -> dict[str, list[tuple]]:
    rng = np.random.default_rng([ctx.seed, block])
    g = np.arange(first, first + n, dtype=np.int64)   # global member index
    member_id = g + 1
    people = make_people(ctx, rng, g, block)
    joined = people["joined"]
    orders = make_orders(ctx, rng, member_id, joined)
    coupons = make_coupons(ctx, rng, member_id, joined, orders)
    devices = make_devices(ctx, rng, member_id, joined, people["age_idx"])
    consents, events = make_consents(ctx, rng, member_id, joined)
    tier, tier_rows, tier_from = make_tiers(ctx, member_id, joined, orders)
    ledger_rows, balance = make_points(ctx, rng, member_id, orders, tier, tier_from)

    pref = np.empty(n, dtype=object)
    for ai in range(-1, len(D.AGE_GROUPS)):
        sel = people["age_idx"] == ai
        if sel.any():
            key = None if ai < 0 else D.AGE_GROUPS[ai][0]
            picks = choice(rng, D.CHANNEL_ORDER_WEIGHTS[key], int(sel.sum()))
            pref[sel] = np.array(D.CHANNEL_ORDERS, dtype=object)[picks]

    joined_s = fmt_ts(joined)
    as_of_s = fmt_ts(np.array([ctx.as_of]))[0]
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
