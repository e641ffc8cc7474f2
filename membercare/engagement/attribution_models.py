"""Tables of the attribution and reporting layer: credited conversions and SMS segment counts.

``attributions`` holds one row per (model, conversion, credited message). It is *derived* data,
recomputed set-based for a time range by :func:`membercare.engagement.attribution.compute_attributions`
(delete the range, insert it again in one transaction), so a recompute yields the same rows and a
refunded order disappears from the credit on the next recompute.

``sms_message_segments`` caches the number of SMS segments of each sent SMS. The count lives inside the
outbox row's compressed rendered content (``outbox_messages.content``), which SQL cannot read; the
report decodes each sent SMS once and stores the count here so that segment and cost totals are SQL
aggregates (see :func:`membercare.reports.sms.refresh_sms_segments`).

Migration: ``membercare/migrations/versions/0005_attribution.py``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field

from membercare.models import ID, TableModel
from membercare.timeutil import UTCDateTime, utcnow


def _in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(e.value) for e in enum)})"


class AttributionModel(StrEnum):
    """How a conversion's credit is assigned (see docs/reports.md)."""

    LAST_TOUCH = "last_touch"  # the latest qualifying touch inside the window (the default)
    FIRST_TOUCH = "first_touch"  # the earliest qualifying touch inside the window
    HOLDOUT = "holdout"  # a holdout member's conversion after their campaign's (unsent) message


class ConversionType(StrEnum):
    ORDER = "order"  # a purchase (orders.status in PURCHASE_STATUSES); carries the revenue
    COUPON = "coupon"  # a coupon redemption; revenue stays with its order, so it carries none


class Attribution(TableModel, table=True):
    __tablename__ = "attributions"
    __table_args__ = (
        sa.UniqueConstraint("model", "conversion_type", "conversion_id", "message_id",
                            name="uq_attributions_conversion_message"),
        sa.CheckConstraint(_in("model", AttributionModel), name="ck_attributions_model"),
        sa.CheckConstraint(_in("conversion_type", ConversionType), name="ck_attributions_conversion_type"),
        sa.CheckConstraint("revenue_minor >= 0", name="ck_attributions_revenue_nonneg"),
        sa.Index("ix_attributions_model_converted", "model", "converted_at"),
        sa.Index("ix_attributions_message", "message_id"),
        sa.Index("ix_attributions_campaign", "campaign", "converted_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    model: str = Field(max_length=16)
    conversion_type: str = Field(max_length=8)
    conversion_id: int = Field(sa_type=ID, description="orders.id or coupons.id, by conversion_type")
    order_id: int | None = Field(default=None, foreign_key="orders.id", sa_type=ID)
    coupon_id: int | None = Field(default=None, foreign_key="coupons.id", sa_type=ID)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    converted_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    revenue_minor: int = Field(default=0, sa_type=sa.BigInteger)
    currency: str = Field(default="TWD", max_length=3)
    # The credited message (outbox row) and what it belonged to, copied so reports need no join.
    message_id: str = Field(max_length=32)
    run_id: int = Field(sa_type=ID)
    campaign: str = Field(max_length=64)
    occurrence: str = Field(max_length=64)
    channel: str | None = Field(default=None, max_length=8, description="NULL for holdout credit")
    variant: str | None = Field(default=None, max_length=32)
    touch_kind: str = Field(max_length=16, description="the engagement event kind, or 'holdout'")
    touched_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    window_seconds: int
    computed_at: datetime = Field(sa_type=UTCDateTime, nullable=False, default_factory=utcnow)


class SmsMessageSegments(TableModel, table=True):
    __tablename__ = "sms_message_segments"

    message_id: str = Field(primary_key=True, max_length=32)
    segments: int
