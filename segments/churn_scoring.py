"""Fit BG/NBD on the shop's own orders and store P(alive) and expected purchases per buyer.

Pipeline (``membercare churn score``):

1. Per member, in SQL: purchase days (UTC calendar days of purchases placed at or before ``as_of``;
   same-day orders merged, cancelled/refunded never count) give ``x`` = days - 1, ``t_x`` = last day -
   first day and ``T`` = as_of's UTC day - first day, all in whole days.
2. Still in SQL, those rows are grouped by ``(x, t_x, T)`` with a count: a million members collapse
   into far fewer distinct rows, which are streamed into numpy and fitted as a weighted likelihood
   (weeks as the period, like the literature).
3. P(alive) and expected purchases in the next ``horizon_days`` are computed per distinct row, written
   to a temporary table, and joined back to the per-member summary by one ``INSERT ... SELECT``.

Members with no purchase get no score (the model starts at a first purchase).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.models import PURCHASE_STATUSES, Order
from membercare.scoring_models import ChurnModelFit, ChurnScore
from membercare.timeutil import utcnow
from segments import churn, sqlfn
from segments.base import SegmentContext

o = Order.__table__
cf = ChurnModelFit.__table__
cs = ChurnScore.__table__


@dataclass(frozen=True)
class ChurnRun:
    params: churn.BGNBDParams
    fit_id: int
    as_of_date: object
    scored: int
    distinct_rows: int
    at_risk: int  # repeat buyers with P(alive) < 0.5, for the command's summary line


def member_summary(ctx: SegmentContext) -> sa.Subquery:
    """Per-member (x, t_x, T) in whole days as of ``ctx.as_of``."""
    day = sqlfn.utc_day_number(ctx.dialect, o.c.placed_at)
    as_of_day = sqlfn.py_day_number(ctx.as_of.date())
    days = (
        sa.select(o.c.member_id, day.label("d"))
        .where(o.c.status.in_(PURCHASE_STATUSES), o.c.placed_at <= ctx.as_of_lit)
        .group_by(o.c.member_id, day)
        .subquery("days")
    )
    return (
        sa.select(
            days.c.member_id,
            (sa.func.count() - 1).label("x"),
            (sa.func.max(days.c.d) - sa.func.min(days.c.d)).label("tx"),
            (sa.literal(as_of_day, sa.Integer) - sa.func.min(days.c.d)).label("age"),
        )
        .group_by(days.c.member_id)
        .subquery("summary")
    )


def load_grouped_summary(ctx: SegmentContext, *, chunk: int = 50_000) -> tuple[np.ndarray, churn.Summary]:
    """Distinct (x, tx_days, T_days) rows with their member counts, streamed into numpy."""
    s = member_summary(ctx)
    q = sa.select(s.c.x, s.c.tx, s.c.age, sa.func.count()).group_by(s.c.x, s.c.tx, s.c.age)
    parts = []
    result = ctx.conn.execute(q, execution_options={"yield_per": chunk})
    for part in result.partitions(chunk):
        parts.append(np.asarray(part, dtype=np.int64).reshape(-1, 4))
    grid = np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)
    summary = churn.Summary.from_arrays(
        grid[:, 0], grid[:, 1] / churn.DAYS_PER_PERIOD, grid[:, 2] / churn.DAYS_PER_PERIOD, grid[:, 3]
    )
    return grid, summary


def score_churn(conn: Connection, as_of: datetime, *, shop_timezone: str = "UTC", horizon_days: int = 30) -> ChurnRun:
    """Fit the model on purchases up to ``as_of`` and store one score per buyer for the snapshot date."""
    ctx = SegmentContext(conn, as_of, shop_timezone)
    grid, summary = load_grouped_summary(ctx)
    params = churn.fit(summary)
    p_alive = np.clip(churn.p_alive(params, summary.x, summary.t_x, summary.T), 0.0, 1.0)
    expected = churn.expected_purchases(params, horizon_days / churn.DAYS_PER_PERIOD, summary.x, summary.t_x, summary.T)

    # Replace this date's snapshot: scores first (they reference the fit), then the fit.
    old = sa.select(cf.c.id).where(cf.c.as_of_date == ctx.as_of_date).scalar_subquery()
    conn.execute(cs.delete().where(cs.c.as_of_date == ctx.as_of_date))
    conn.execute(cs.delete().where(cs.c.fit_id == old))
    conn.execute(cf.delete().where(cf.c.as_of_date == ctx.as_of_date))
    fit_id = conn.execute(
        cf.insert().values(
            as_of_date=ctx.as_of_date, calibration_end=ctx.as_of, fitted_at=utcnow(), r=params.r, alpha=params.alpha,
            a=params.a, b=params.b, log_likelihood=params.log_likelihood, customers=params.customers,
            converged=params.converged, horizon_days=horizon_days,
        ).returning(cf.c.id)
    ).scalar_one()

    md = sa.MetaData()
    tmp = sa.Table(
        "tmp_churn_grid", md,
        sa.Column("x", sa.Integer, primary_key=True), sa.Column("tx", sa.Integer, primary_key=True),
        sa.Column("age", sa.Integer, primary_key=True), sa.Column("p_alive", sa.Float), sa.Column("expected", sa.Float),
        prefixes=["TEMPORARY"],
    )
    tmp.drop(conn, checkfirst=True)
    tmp.create(conn)
    try:
        rows = [
            {"x": int(a), "tx": int(b), "age": int(c), "p_alive": float(p), "expected": float(e)}
            for (a, b, c, _), p, e in zip(grid, p_alive, expected, strict=True)
        ]
        for i in range(0, len(rows), 20_000):
            conn.execute(tmp.insert(), rows[i:i + 20_000])
        s = member_summary(ctx)
        sel = sa.select(
            s.c.member_id, sa.literal(ctx.as_of_date, sa.Date), sa.literal(fit_id, sa.Integer),
            s.c.x, s.c.tx, s.c.age, tmp.c.p_alive, tmp.c.expected,
        ).join_from(s, tmp, sa.and_(tmp.c.x == s.c.x, tmp.c.tx == s.c.tx, tmp.c.age == s.c.age))
        conn.execute(cs.insert().from_select(
            ["member_id", "as_of_date", "fit_id", "frequency", "recency_days", "age_days", "p_alive",
             "expected_purchases"], sel))
    finally:
        tmp.drop(conn)
    scored, at_risk = conn.execute(
        sa.select(sa.func.count(), sa.func.count().filter(sa.and_(cs.c.frequency >= 1, cs.c.p_alive < 0.5)))
        .where(cs.c.as_of_date == ctx.as_of_date)
    ).one()
    return ChurnRun(params, int(fit_id), ctx.as_of_date, int(scored), len(grid), int(at_risk))
