"""CUPED: treated-vs-holdout lifts adjusted for the members' pre-period behaviour (``membercare report --cuped``).

Deng, Xu, Kohavi and Walker, "Improving the Sensitivity of Online Controlled Experiments by Utilizing
Pre-Experiment Data" (WSDM 2013). A member's spend before the campaign predicts their spend after it whatever the
arm; subtracting ``theta`` times the (centred) pre-period covariate removes that predictable part of the outcome,
so the interval narrows by ``sqrt(1 - rho^2)`` while the estimate stays unbiased (the covariate is measured before
assignment, so its arm means differ only by chance).

* **Covariate**: per outbox row, the member's purchases in ``[as_of - pre_days, as_of)`` of the row's run (the
  occurrence's ``as_of``: strictly before anything the campaign could cause). Revenue per member is adjusted with
  the pre-period spend; conversion with the pre-period purchase indicator (did the member buy in the window), the
  binary analogue.
* **Ratio form with member clusters**: as in :mod:`membercare.reports.stats`, an arm's metric is the ratio
  ``R_y = sum y_i / sum m_i`` over members ``i`` with ``m_i`` rows, and the covariate's ``R_x`` likewise. With the
  linearised residuals ``u_i = y_i - R_y m_i`` and ``v_i = x_i - R_x m_i``, the adjusted difference is
  ``(R_y,t - R_y,c) - theta (R_x,t - R_x,c)``, ``theta = sum_arms sum u v / sum_arms sum v^2`` (the within-arm
  covariance over the within-arm variance, pooled over the two arms), and each arm's cluster-robust (CR1) variance
  is ``n / (n - 1) * sum (u_i - theta v_i)^2 / (sum m_i)^2``. With one row per member this is exactly the
  coefficient of the arm in the OLS regression ``y ~ 1 + arm + x`` (``tests/test_cuped.py`` checks it against a
  least-squares fit); the unadjusted variance (``theta = 0``) is the report's member-clustered one.
* Everything comes from per-arm sums (``n, sum m, sum y, sum m^2, sum y m, sum y^2`` and the same with ``x``),
  one SQL ``GROUP BY`` over a per-member subquery (:func:`covariate_sums_query`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from numpy.typing import ArrayLike
from scipy import stats as sps
from sqlalchemy.engine import Connection

from membercare.db import is_sqlite
from membercare.delivery.models import CampaignRun
from membercare.models import PURCHASE_STATUSES, Order
from membercare.reports.sql import OB
from membercare.reports.stats import Interval

DEFAULT_PRE_DAYS = 90
# metric -> (outcome column, covariate column, covariate label) of the per-member subquery.
ADJUSTED = {"conversion": ("conv", "pre_buy", "bought in the pre-period"),
            "revenue": ("rev", "pre_rev", "pre-period spend")}


@dataclass(frozen=True)
class CovariateSums:
    """Per-arm sums over members: ``n`` members, rows ``m``, outcome ``y``, covariate ``x`` and their products."""

    n: int
    m: float
    y: float
    mm: float
    ym: float
    yy: float
    x: float
    xm: float
    xx: float
    xy: float

    @classmethod
    def from_arrays(cls, outcome: ArrayLike, covariate: ArrayLike, rows: ArrayLike | None = None) -> CovariateSums:
        """Sums of per-member arrays (``rows``: rows per member, 1 each by default)."""
        y, x = np.asarray(outcome, dtype=float), np.asarray(covariate, dtype=float)
        m = np.ones_like(y) if rows is None else np.asarray(rows, dtype=float)
        if y.shape != x.shape or y.shape != m.shape or np.any(m < 0):
            raise ValueError("outcome, covariate and rows need the same shape and no negative row counts")
        return cls(int(y.size), float(m.sum()), float(y.sum()), float((m * m).sum()), float((y * m).sum()),
                   float((y * y).sum()), float(x.sum()), float((x * m).sum()), float((x * x).sum()),
                   float((x * y).sum()))

    @property
    def rate(self) -> float:
        return self.y / self.m if self.m > 0 else math.nan

    @property
    def covariate_rate(self) -> float:
        return self.x / self.m if self.m > 0 else math.nan

    def moments(self) -> tuple[float, float, float]:
        """``(sum u^2, sum v^2, sum u v)`` of the linearised residuals of the outcome and covariate ratios."""
        ry, rx = self.rate, self.covariate_rate
        suu = self.yy - 2.0 * ry * self.ym + ry * ry * self.mm
        svv = self.xx - 2.0 * rx * self.xm + rx * rx * self.mm
        suv = self.xy - rx * self.ym - ry * self.xm + ry * rx * self.mm
        return max(suu, 0.0), max(svv, 0.0), suv


@dataclass
class CupedCheck:
    """One metric's lift, unadjusted and CUPED-adjusted, with member-clustered intervals."""

    metric: str
    covariate: str
    pre_days: int
    theta: float
    correlation: float  # pooled within-arm correlation of outcome and covariate
    covariate_treated: float  # covariate per row, treated arm (a balance check: differs only by chance)
    covariate_control: float
    unadjusted_difference: float
    unadjusted_interval: Interval
    difference: float  # CUPED-adjusted
    interval: Interval
    p_value: float
    variance_reduction: float  # 1 - adjusted variance / unadjusted variance (0.36 -> interval 20 % narrower)

    @property
    def width_ratio(self) -> float:
        """Adjusted interval width over the unadjusted one (``sqrt(1 - variance_reduction)``)."""
        return math.sqrt(max(1.0 - self.variance_reduction, 0.0))


def cuped_lift(treated: CovariateSums, control: CovariateSums, *, metric: str = "revenue",
               covariate: str = "pre-period spend", pre_days: int = DEFAULT_PRE_DAYS,
               confidence: float = 0.95) -> CupedCheck | None:
    """The CUPED-adjusted difference (treated minus control) and its interval beside the unadjusted one.
    None when an arm has fewer than two members or no rows."""
    if treated.n < 2 or control.n < 2 or treated.m <= 0 or control.m <= 0:
        return None
    z = float(sps.norm.ppf(0.5 + confidence / 2.0))
    (tuu, tvv, tuv), (cuu, cvv, cuv) = treated.moments(), control.moments()
    svv, suv, suu = tvv + cvv, tuv + cuv, tuu + cuu
    theta = suv / svv if svv > 0 else 0.0
    corr = suv / math.sqrt(suu * svv) if suu > 0 and svv > 0 else math.nan

    def variance(arm: CovariateSums, uu: float, vv: float, uv: float, th: float) -> float:
        resid = max(uu - 2.0 * th * uv + th * th * vv, 0.0)
        return arm.n / (arm.n - 1.0) * resid / arm.m ** 2

    raw = treated.rate - control.rate
    v_raw = variance(treated, tuu, tvv, tuv, 0.0) + variance(control, cuu, cvv, cuv, 0.0)
    adjusted = raw - theta * (treated.covariate_rate - control.covariate_rate)
    v_adj = variance(treated, tuu, tvv, tuv, theta) + variance(control, cuu, cvv, cuv, theta)
    se_raw, se_adj = math.sqrt(v_raw), math.sqrt(v_adj)
    p = 2.0 * float(sps.norm.sf(abs(adjusted) / se_adj)) if se_adj > 0 else math.nan
    return CupedCheck(metric, covariate, pre_days, theta, corr, treated.covariate_rate, control.covariate_rate,
                      raw, (raw - z * se_raw, raw + z * se_raw), adjusted,
                      (adjusted - z * se_adj, adjusted + z * se_adj), p,
                      1.0 - v_adj / v_raw if v_raw > 0 else math.nan)


# ---------------------------------------------------------------------------------------------------------------------
# SQL


def _epoch_ms(col: Any) -> sa.ColumnElement[int]:
    return sa.cast(sa.func.round((sa.func.julianday(col) - 2440587.5) * 86400000.0), sa.BigInteger)


def _pre_window(conn: Connection, placed_at: Any, as_of: Any, days: int) -> sa.ColumnElement[bool]:
    """``as_of - days <= placed_at < as_of`` (SQLite: integer milliseconds, its stored text mixes formats)."""
    if is_sqlite(conn):
        p, a = _epoch_ms(placed_at), _epoch_ms(as_of)
        return sa.and_(p < a, p >= a - int(days) * 86_400_000)
    return sa.and_(placed_at < as_of, placed_at >= as_of - sa.literal_column(f"interval '{int(days)} days'"))


def pre_period(conn: Connection, row_ids: Any, days: int) -> sa.Subquery:
    """Per outbox row (``row_ids``: a select of ``OB.c.id``): the member's spend (``pre_rev``) and purchase count
    (``pre_orders``) in the ``days`` before the row's run ``as_of``."""
    o, r = Order.__table__, CampaignRun.__table__
    window = sa.and_(o.c.member_id == OB.c.member_id, o.c.status.in_(PURCHASE_STATUSES),
                     _pre_window(conn, o.c.placed_at, r.c.as_of, days))
    rev = sa.select(sa.func.coalesce(sa.func.sum(o.c.total_minor), 0)).select_from(o).where(window).scalar_subquery()
    orders = sa.select(sa.func.count(o.c.id)).select_from(o).where(window).scalar_subquery()
    return (sa.select(OB.c.id, rev.label("pre_rev"), orders.label("pre_orders"))
            .select_from(OB.join(r, r.c.id == OB.c.run_id)).where(OB.c.id.in_(row_ids)).subquery("pre_period"))


def covariate_sums_query(conn: Connection, per_row: Any, pre: Any) -> sa.Select[Any]:
    """Per campaign and arm: the :class:`CovariateSums` of every metric in :data:`ADJUSTED`, from the report's
    per-row outcomes (``per_row``: id, campaign, member_id, holdout, revenue, orders) and :func:`pre_period`."""
    big = sa.Float if is_sqlite(conn) else sa.Numeric
    per_member = sa.select(
        per_row.c.campaign, per_row.c.holdout, per_row.c.member_id, sa.func.count().label("m"),
        sa.func.sum(sa.case((per_row.c.orders > 0, 1), else_=0)).label("conv"),
        sa.func.sum(sa.cast(per_row.c.revenue, big)).label("rev"),
        sa.func.sum(sa.case((pre.c.pre_orders > 0, 1), else_=0)).label("pre_buy"),
        sa.func.sum(sa.cast(pre.c.pre_rev, big)).label("pre_rev"),
    ).select_from(per_row.join(pre, pre.c.id == per_row.c.id)).group_by(
        per_row.c.campaign, per_row.c.holdout, per_row.c.member_id).subquery("cuped_members")
    pm = per_member.c
    m = sa.cast(pm.m, big)
    cols: list[Any] = [pm.campaign, pm.holdout, sa.func.count().label("n"), sa.func.sum(m).label("m_"),
                       sa.func.sum(m * m).label("mm")]
    for y_name, x_name, _ in ADJUSTED.values():
        y, x = sa.cast(pm[y_name], big), sa.cast(pm[x_name], big)
        cols += [sa.func.sum(y).label(f"{y_name}_y"), sa.func.sum(y * m).label(f"{y_name}_ym"),
                 sa.func.sum(y * y).label(f"{y_name}_yy"), sa.func.sum(x).label(f"{x_name}_x"),
                 sa.func.sum(x * m).label(f"{x_name}_xm"), sa.func.sum(x * x).label(f"{x_name}_xx"),
                 sa.func.sum(x * y).label(f"{y_name}_{x_name}_xy")]
    return sa.select(*cols).group_by(pm.campaign, pm.holdout)


def _sums(row: Any, metric: str) -> CovariateSums:
    y, x, _ = ADJUSTED[metric]

    def f(name: str) -> float:
        value = getattr(row, name)
        return 0.0 if value is None else float(value)

    return CovariateSums(int(row.n), f("m_"), f(f"{y}_y"), f("mm"), f(f"{y}_ym"), f(f"{y}_yy"), f(f"{x}_x"),
                         f(f"{x}_xm"), f(f"{x}_xx"), f(f"{y}_{x}_xy"))


def cuped_checks(conn: Connection, per_row: Any, row_ids: Any, *, pre_days: int,
                 confidence: float) -> dict[str, list[CupedCheck]]:
    """Campaign -> its CUPED checks (conversion, then revenue per member) for the report's holdout comparisons."""
    arms: dict[str, dict[int, Any]] = {}
    query = covariate_sums_query(conn, per_row, pre_period(conn, row_ids, pre_days))
    for r in conn.execute(query):
        arms.setdefault(r.campaign, {})[int(r.holdout)] = r
    out: dict[str, list[CupedCheck]] = {}
    for campaign, by_arm in arms.items():
        if 0 not in by_arm or 1 not in by_arm:
            continue
        checks = [cuped_lift(_sums(by_arm[0], metric), _sums(by_arm[1], metric), metric=metric, covariate=label,
                             pre_days=pre_days, confidence=confidence)
                  for metric, (_, _, label) in ADJUSTED.items()]
        out[campaign] = [c for c in checks if c is not None]
    return out


__all__ = ["ADJUSTED", "DEFAULT_PRE_DAYS", "CovariateSums", "CupedCheck", "covariate_sums_query", "cuped_checks",
           "cuped_lift", "pre_period"]
