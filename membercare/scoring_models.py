"""Tables written by member scoring: RFM scores, BG/NBD churn fits and churn scores.

Scores are snapshots keyed ``(member_id, as_of_date)``: re-scoring the same date replaces that
date's rows, older dates are kept so that "who was at risk last month" stays answerable. Segments
read the latest snapshot on or before their own ``as_of`` (see :mod:`segments.standard`).

The migration is ``membercare/migrations/versions/0002_scoring.py``; it also adds the covering
indexes on ``orders`` and ``order_lines`` that the segment and scoring queries scan.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field

from membercare.models import ID, TableModel, _in
from membercare.timeutil import UTCDateTime, utcnow


class RFMCell(StrEnum):
    """Named RFM cells; the (R, F) grid that maps to them is in :mod:`segments.rfm` and docs/segments.md."""

    CHAMPIONS = "champions"
    LOYAL = "loyal"
    POTENTIAL_LOYALIST = "potential_loyalist"
    NEW = "new"
    PROMISING = "promising"
    NEED_ATTENTION = "need_attention"
    ABOUT_TO_SLEEP = "about_to_sleep"
    AT_RISK = "at_risk"
    CANNOT_LOSE = "cannot_lose"
    HIBERNATING = "hibernating"
    LOST = "lost"


class RFMScore(TableModel, table=True):
    """Recency/frequency/monetary quintile scores (1 = worst, 5 = best) of one buyer on one date."""

    __tablename__ = "rfm_scores"
    __table_args__ = (
        sa.CheckConstraint("r_score BETWEEN 1 AND 5 AND f_score BETWEEN 1 AND 5 AND m_score BETWEEN 1 AND 5",
                           name="ck_rfm_scores_range"),
        sa.CheckConstraint(_in("cell", RFMCell), name="ck_rfm_scores_cell"),
        sa.Index("ix_rfm_scores_date_cell", "as_of_date", "cell"),
    )

    member_id: int = Field(foreign_key="members.id", sa_type=ID, primary_key=True)
    as_of_date: date = Field(primary_key=True)
    last_purchase_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    recency_days: int
    frequency: int
    monetary_minor: int = Field(sa_type=sa.BigInteger)
    r_score: int
    f_score: int
    m_score: int
    cell: str = Field(max_length=24)


class ChurnModelFit(TableModel, table=True):
    """One BG/NBD fit on the shop's own orders (time unit: weeks)."""

    __tablename__ = "churn_model_fits"

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    as_of_date: date = Field(unique=True)
    calibration_end: datetime = Field(sa_type=UTCDateTime, nullable=False)
    fitted_at: datetime = Field(sa_type=UTCDateTime, nullable=False, default_factory=utcnow)
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    converged: bool
    horizon_days: int = Field(description="the period of churn_scores.expected_purchases")


class ChurnScore(TableModel, table=True):
    """A buyer's BG/NBD summary and scores on one date (weeks; same-day orders merged, UTC days)."""

    __tablename__ = "churn_scores"
    __table_args__ = (
        sa.CheckConstraint("p_alive >= 0 AND p_alive <= 1", name="ck_churn_scores_p_alive"),
        sa.Index("ix_churn_scores_date_p_alive", "as_of_date", "p_alive"),
    )

    member_id: int = Field(foreign_key="members.id", sa_type=ID, primary_key=True)
    as_of_date: date = Field(primary_key=True)
    fit_id: int = Field(foreign_key="churn_model_fits.id", sa_type=ID, nullable=False)
    frequency: int = Field(description="x: repeat purchase days")
    recency_days: int = Field(description="t_x in days: first to last purchase day")
    age_days: int = Field(description="T in days: first purchase day to as_of_date")
    p_alive: float
    expected_purchases: float = Field(description="expected purchases in the fit's horizon_days")


# Covering indexes for the per-member purchase aggregations (RFM, churn summary, tiers, segments):
# with every referenced column in the index, SQLite aggregates orders in member order straight from
# the index without a sort or table lookups. Declared here (not in models.py) because this module's
# migration creates them.
from membercare.models import Order, OrderLine  # noqa: E402

ORDERS_MEMBER_PURCHASE_INDEX = sa.Index(
    "ix_orders_member_purchase",
    Order.__table__.c.member_id, Order.__table__.c.placed_at, Order.__table__.c.status, Order.__table__.c.total_minor,
)
ORDER_LINES_CATEGORY_INDEX = sa.Index(
    "ix_order_lines_category_order", OrderLine.__table__.c.category, OrderLine.__table__.c.order_id,
)
