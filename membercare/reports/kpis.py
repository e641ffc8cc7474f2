"""Shop KPIs as of ``until`` over the trailing ``active_days`` (365).

Active members (at least one purchase), repurchase rate (buyers with two or more purchases / buyers), average
order value, purchase frequency, members by tier, and an estimated customer lifetime value
``AOV x purchases per buyer per year x expected lifetime``, where the expected lifetime is ``1 / (1 - retention)``
years from the year-over-year buyer retention (capped; an assumed default when the previous year has too few
buyers). When BG/NBD churn scores exist, their mean expected purchases over the fit's horizon x AOV is shown too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.models import PURCHASE_STATUSES, Member, Order, Tier
from membercare.reports.options import ReportOptions
from membercare.reports.sql import sum_if


@dataclass
class Kpis:
    as_of: datetime
    window_days: int
    members_total: int
    members_by_tier: dict[str, int]
    new_members: int  # joined in [since, until)
    active_members: int
    buyers: int
    orders: int
    revenue_minor: int
    aov_minor: float | None
    repurchase_rate: float | None
    purchases_per_buyer_per_year: float | None
    retention_rate: float | None
    expected_lifetime_years: float | None
    lifetime_assumed: bool
    clv_minor: float | None
    period_orders: int
    period_revenue_minor: int
    bgnbd: dict[str, Any] | None = None



def kpis(conn: Connection, options: ReportOptions) -> Kpis:
    m, o, t = Member.__table__, Order.__table__, Tier.__table__
    until = options.until
    year = timedelta(days=options.active_days)
    start, prev = until - year, until - 2 * year
    purchase = o.c.status.in_(PURCHASE_STATUSES)

    members_total = conn.execute(sa.select(sa.func.count()).select_from(m).where(m.c.joined_at < until)).scalar_one()
    new_members = conn.execute(sa.select(sa.func.count()).select_from(m).where(
        m.c.joined_at >= options.since, m.c.joined_at < until)).scalar_one()
    by_tier_rows = conn.execute(
        sa.select(m.c.tier, sa.func.count(), sa.func.min(t.c.rank)).select_from(m.outerjoin(t, t.c.code == m.c.tier))
        .where(m.c.joined_at < until).group_by(m.c.tier)
    ).all()
    by_tier = {tier: int(n) for tier, n, _ in sorted(by_tier_rows, key=lambda r: (r[2] is None, r[2] or 0, r[0]))}

    per_buyer = sa.select(o.c.member_id, sa.func.count().label("n"), sa.func.sum(o.c.total_minor).label("spend")).where(
        purchase, o.c.placed_at >= start, o.c.placed_at < until).group_by(o.c.member_id).subquery("per_buyer")
    buyers, orders, revenue, repeaters = conn.execute(sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(per_buyer.c.n), 0),
        sa.func.coalesce(sa.func.sum(per_buyer.c.spend), 0), sum_if(per_buyer.c.n >= 2),
    )).one()
    buyers, orders, revenue, repeaters = int(buyers), int(orders), int(revenue), int(repeaters)

    prior, retained = _retention(conn, o, purchase, prev, start, until)

    period_orders, period_revenue = conn.execute(sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.total_minor), 0)
    ).where(purchase, o.c.placed_at >= options.since, o.c.placed_at < until)).one()

    aov = revenue / orders if orders else None
    per_year = (orders / buyers) * (365.0 / options.active_days) if buyers else None
    retention = retained / prior if prior else None
    assumed = prior < options.min_buyers_for_retention or retention is None
    if retention is None or assumed:
        lifetime = options.default_lifetime_years
    else:
        lifetime = options.max_lifetime_years if retention >= 1 else min(options.max_lifetime_years,
                                                                           1.0 / (1.0 - retention))
    clv = aov * per_year * lifetime if aov is not None and per_year is not None else None
    return Kpis(
        as_of=until, window_days=options.active_days, members_total=int(members_total), members_by_tier=by_tier,
        new_members=int(new_members), active_members=buyers, buyers=buyers, orders=orders, revenue_minor=revenue,
        aov_minor=aov, repurchase_rate=repeaters / buyers if buyers else None, purchases_per_buyer_per_year=per_year,
        retention_rate=retention, expected_lifetime_years=lifetime, lifetime_assumed=assumed, clv_minor=clv,
        period_orders=int(period_orders), period_revenue_minor=int(period_revenue),
        bgnbd=_bgnbd(conn, until, aov),
    )


def _retention(conn: Connection, o: sa.Table, purchase: sa.ColumnElement[bool], prev: datetime, start: datetime,
               until: datetime) -> tuple[int, int]:
    """(buyers of the previous window, how many of them bought again in the current one)."""
    before = sa.select(o.c.member_id).where(purchase, o.c.placed_at >= prev, o.c.placed_at < start).distinct()
    now_ = sa.select(o.c.member_id).where(purchase, o.c.placed_at >= start, o.c.placed_at < until).distinct()
    b, n = before.subquery("before"), now_.subquery("now")
    prior, retained = conn.execute(sa.select(sa.func.count(b.c.member_id), sa.func.count(n.c.member_id))
                                   .select_from(b.outerjoin(n, n.c.member_id == b.c.member_id))).one()
    return int(prior), int(retained)


def _bgnbd(conn: Connection, until: datetime, aov: float | None) -> dict[str, Any] | None:
    """Mean BG/NBD expected purchases of the latest churn scoring on or before ``until`` (if scored)."""
    names = set(sa.inspect(conn).get_table_names())
    if not {"churn_scores", "churn_model_fits"} <= names:
        return None
    cs, fit = sa.table("churn_scores", sa.column("as_of_date"), sa.column("fit_id"), sa.column("p_alive"),
                       sa.column("expected_purchases")), sa.table("churn_model_fits", sa.column("id"),
                                                                 sa.column("horizon_days"))
    latest = conn.execute(sa.select(sa.func.max(cs.c.as_of_date)).where(cs.c.as_of_date <= until.date())).scalar()
    if latest is None:
        return None
    n, expected, alive, horizon = conn.execute(
        sa.select(sa.func.count(), sa.func.avg(cs.c.expected_purchases), sa.func.avg(cs.c.p_alive),
                  sa.func.max(fit.c.horizon_days))
        .select_from(cs.join(fit, fit.c.id == cs.c.fit_id)).where(cs.c.as_of_date == latest)
    ).one()
    if not n:
        return None
    expected = float(expected)
    return {"as_of_date": latest if isinstance(latest, date) else date.fromisoformat(str(latest)),
            "scored_buyers": int(n), "horizon_days": int(horizon) if horizon is not None else None,
            "mean_expected_purchases": expected, "mean_p_alive": float(alive),
            "expected_revenue_per_buyer_minor": expected * aov if aov is not None else None}

