"""Read-side queries about one member (used by ``membercare members show`` and previews)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.errors import InputError
from membercare.models import (
    PURCHASE_STATUSES,
    Consent,
    Coupon,
    Device,
    Member,
    Order,
    OrderLine,
    TierHistory,
)


@dataclass
class MemberProfile:
    member: dict
    consents: list[dict]
    tiers: list[dict]
    orders: list[dict]
    coupons: list[dict]
    purchase_count: int
    purchase_total: int
    currency: str
    live_devices: int
    dead_devices: int


def member_profile(conn: Connection, external_id: str, *, recent_orders: int = 5) -> MemberProfile | None:
    m = Member.__table__
    row = conn.execute(sa.select(m).where(m.c.external_id == external_id)).mappings().first()
    if row is None:
        return None
    mid = row["id"]
    c = Consent.__table__
    consents = conn.execute(
        sa.select(c).where(c.c.member_id == mid).order_by(c.c.channel, c.c.purpose)
    ).mappings().all()
    th = TierHistory.__table__
    tiers = conn.execute(sa.select(th).where(th.c.member_id == mid).order_by(th.c.valid_from.desc())).mappings().all()
    o, ol = Order.__table__, OrderLine.__table__
    cats = (
        sa.select(sa.func.group_concat(sa.distinct(ol.c.category)) if conn.dialect.name == "sqlite"
                  else sa.func.string_agg(sa.distinct(ol.c.category), sa.literal_column("','")))
        .where(ol.c.order_id == o.c.id)
        .scalar_subquery()
    )
    orders = conn.execute(
        sa.select(o, cats.label("categories")).where(o.c.member_id == mid)
        .order_by(o.c.placed_at.desc()).limit(recent_orders)
    ).mappings().all()
    agg = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.total_minor), 0), sa.func.max(o.c.currency))
        .where(o.c.member_id == mid, o.c.status.in_(PURCHASE_STATUSES))
    ).one()
    cp = Coupon.__table__
    coupons = conn.execute(sa.select(cp).where(cp.c.member_id == mid).order_by(cp.c.expires_at.desc())).mappings().all()
    d = Device.__table__
    live, dead = conn.execute(
        sa.select(
            sa.func.count().filter(d.c.invalidated_at.is_(None)),
            sa.func.count().filter(d.c.invalidated_at.is_not(None)),
        ).where(d.c.member_id == mid)
    ).one()
    return MemberProfile(
        member=dict(row), consents=[dict(x) for x in consents], tiers=[dict(x) for x in tiers],
        orders=[dict(x) for x in orders], coupons=[dict(x) for x in coupons],
        purchase_count=int(agg[0]), purchase_total=int(agg[1]), currency=agg[2] or "TWD",
        live_devices=int(live or 0), dead_devices=int(dead or 0),
    )


@dataclass
class MemberValue:
    """A member's expected residual lifetime value and P(alive) at ``as_of`` (``known`` False: no purchase up to
    then, or ``note`` says why the shop's models could not be fitted)."""

    as_of: datetime
    months: int
    annual_discount: float
    known: bool
    value_minor: float | None = None
    p_alive: float | None = None
    purchase_days: int = 0
    note: str = ""


def member_value(conn: Connection, member_id: int, as_of: datetime, *, months: int = 12,
                 annual_discount: float = 0.10) -> MemberValue:
    """Fit the shop's BG/NBD and Gamma-Gamma models at ``as_of`` (:mod:`membercare.lifetime_value`) and read one
    member's figures. The fit covers every buyer (about 1.5 s at 10,000 members)."""
    from membercare.lifetime_value import value_snapshot

    try:
        snap = value_snapshot(conn, as_of, months=months, annual_discount=annual_discount)
    except InputError as exc:
        return MemberValue(as_of, months, annual_discount, False, note=f"no value model: {exc}")
    value, alive, known = snap.lookup([member_id])
    if not bool(known[0]):
        return MemberValue(snap.as_of, months, annual_discount, False, note="no purchase up to as_of")
    days = int(snap.purchases[snap.member_id.searchsorted(member_id)])
    return MemberValue(snap.as_of, months, annual_discount, True, float(value[0]), float(alive[0]), days)
