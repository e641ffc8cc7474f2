"""The shop's data model (SQLModel tables).

Conventions, chosen now so that later tables (campaign runs, outbox messages, engagement events,
suppressions) fit without migrations of the old ones:

* Primary keys are 64-bit integers (``INTEGER`` on SQLite so that they alias the rowid).
  The shop's own identifiers live in ``external_id``/``code``/``sku`` columns with unique
  constraints; imports upsert on them.
* Every timestamp is aware UTC (:class:`membercare.timeutil.UTCDateTime`). Calendar dates that
  have no time (birthdays) are ``date``.
* Money is stored as integers in hundredths of the currency unit (``*_minor``) next to an ISO 4217
  ``currency``: exact on every backend, cheap to sum in SQL. NT$1,200 is ``120000``.
* Enumerations are short strings validated by CHECK constraints, so that SQL stays readable and
  portable; the Python side uses the ``StrEnum`` classes below.
* Consent is an append-only history (:class:`ConsentEvent`) plus a current-state table
  (:class:`Consent`) maintained in the same transaction by :mod:`membercare.consent`.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import ClassVar

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from membercare.timeutil import UTCDateTime, utcnow

# 64-bit ids on PostgreSQL; plain INTEGER on SQLite so the column aliases the rowid (autoincrement).
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class TableModel(SQLModel):
    """Base of every table model: declares for type checkers the ``__table__`` that SQLModel sets on each
    ``table=True`` subclass (the core queries through ``Model.__table__.c``)."""

    __table__: ClassVar[sa.Table]


def _in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(e.value) for e in enum)})"


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    LINE = "line"


# A LINE user id as the Messaging API gives it: "U" and 32 lower-case hexadecimal digits.
LINE_USER_ID_PATTERN = r"^U[0-9a-f]{32}$"


class Purpose(StrEnum):
    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"


class ConsentSource(StrEnum):
    SIGNUP_FORM = "signup_form"
    IMPORT = "import"
    PREFERENCE_CENTER = "preference_center"
    UNSUBSCRIBE_LINK = "unsubscribe_link"
    LIST_UNSUBSCRIBE = "list_unsubscribe"
    SMS_STOP = "sms_stop"
    SMS_START = "sms_start"
    LINE_FOLLOW = "line_follow"  # the member added the shop's LINE Official Account as a friend (or unblocked it)
    LINE_UNFOLLOW = "line_unfollow"  # the member blocked the account (LINE's unfollow event)
    LINE_STOP = "line_stop"  # the member wrote an opt-out keyword ("取消", "STOP") to the account
    COMPLAINT = "complaint"
    SUPPORT = "support"
    GENERATED = "generated"


class OrderStatus(StrEnum):
    PLACED = "placed"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


# Orders in these states are not purchases: they never count for RFM, tiers, churn or attribution.
NON_PURCHASE_STATUSES: tuple[str, ...] = (OrderStatus.CANCELLED.value, OrderStatus.REFUNDED.value)
PURCHASE_STATUSES: tuple[str, ...] = tuple(s.value for s in OrderStatus if s.value not in NON_PURCHASE_STATUSES)


class CouponKind(StrEnum):
    AMOUNT = "amount"
    PERCENT = "percent"


class Platform(StrEnum):
    IOS = "ios"
    ANDROID = "android"
    WEB = "web"


class PointsKind(StrEnum):
    EARNED = "earned"
    SPENT = "spent"
    EXPIRED = "expired"
    ADJUSTED = "adjusted"


class TierChangeReason(StrEnum):
    INITIAL = "initial"
    IMPORT = "import"
    UPGRADE = "upgrade"
    RENEWAL = "renewal"
    DOWNGRADE = "downgrade"
    MANUAL = "manual"


def _ts(nullable: bool = False, index: bool = False, **kw):
    return Field(sa_type=UTCDateTime, nullable=nullable, index=index, **kw)


class Member(TableModel, table=True):
    __tablename__ = "members"
    __table_args__ = (
        sa.CheckConstraint("points_balance >= 0", name="ck_members_points_nonneg"),
        sa.CheckConstraint("phone IS NULL OR phone LIKE '+%'", name="ck_members_phone_e164"),
        sa.Index("uq_members_line_user_id", "line_user_id", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    external_id: str = Field(max_length=64, unique=True, nullable=False)
    name: str = Field(max_length=200)
    email: str | None = Field(default=None, max_length=254, index=True)
    phone: str | None = Field(default=None, max_length=20, description="E.164, e.g. +886912345678")
    # The member's LINE user id for the shop's Messaging API channel ("U" + 32 hex digits): given by LINE
    # Login or the account-link flow, never the display name. Unique: one LINE account is one member.
    line_user_id: str | None = Field(default=None, max_length=64)
    country: str = Field(default="TW", max_length=2, description="ISO 3166 region used to parse local phone numbers")
    locale: str = Field(default="zh-TW", max_length=16)
    timezone: str = Field(default="Asia/Taipei", max_length=64, description="IANA zone name")
    birthday: date | None = Field(default=None, description="Feb 29 allowed")
    age_group: str | None = Field(default=None, max_length=16)
    region: str | None = Field(default=None, max_length=64, index=True)
    city: str | None = Field(default=None, max_length=64)
    joined_at: datetime = _ts(index=True)
    tier: str = Field(default="silver", max_length=16, index=True)
    points_balance: int = Field(default=0)
    # Ordered, comma-separated channel list, most preferred first: "push,email,sms".
    preferred_channels: str = Field(default="email,sms,push", max_length=32)
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)

    @property
    def channel_order(self) -> list[str]:
        return [c for c in self.preferred_channels.split(",") if c]


class Consent(TableModel, table=True):
    """Current consent state per member x channel x purpose (derived from :class:`ConsentEvent`)."""

    __tablename__ = "consents"
    __table_args__ = (
        sa.UniqueConstraint("member_id", "channel", "purpose", name="uq_consents_member_channel_purpose"),
        sa.CheckConstraint(_in("channel", Channel), name="ck_consents_channel"),
        sa.CheckConstraint(_in("purpose", Purpose), name="ck_consents_purpose"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    channel: str = Field(max_length=8)
    purpose: str = Field(max_length=16)
    granted: bool
    source: str = Field(max_length=32)
    changed_at: datetime = _ts()


class ConsentEvent(TableModel, table=True):
    """Append-only consent audit trail. Never updated or deleted."""

    __tablename__ = "consent_events"
    __table_args__ = (
        # The same statement recorded twice (re-import, webhook retry) is stored once.
        sa.UniqueConstraint(
            "member_id", "channel", "purpose", "occurred_at", "granted", name="uq_consent_events_statement"
        ),
        sa.CheckConstraint(_in("channel", Channel), name="ck_consent_events_channel"),
        sa.CheckConstraint(_in("purpose", Purpose), name="ck_consent_events_purpose"),
        sa.Index("ix_consent_events_member", "member_id", "occurred_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    channel: str = Field(max_length=8)
    purpose: str = Field(max_length=16)
    granted: bool
    source: str = Field(max_length=32)
    occurred_at: datetime = _ts()
    recorded_at: datetime = _ts(default_factory=utcnow)
    detail: str | None = Field(default=None, max_length=500)


class Device(TableModel, table=True):
    __tablename__ = "devices"
    __table_args__ = (sa.CheckConstraint(_in("platform", Platform), name="ck_devices_platform"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False, index=True)
    token: str = Field(max_length=512, unique=True)
    platform: str = Field(max_length=8)
    app_id: str = Field(max_length=128)
    created_at: datetime = _ts(default_factory=utcnow)
    last_seen_at: datetime = _ts()
    invalidated_at: datetime | None = _ts(nullable=True, default=None)
    invalid_reason: str | None = Field(default=None, max_length=64)


class Product(TableModel, table=True):
    """A catalogue item. ``stock`` is the current number on hand (``None``: the shop does not say, treated as
    available); ``arrived_at`` is when it was first offered; ``restocked_at`` is the last time its stock went
    from 0 to above 0 (set by the products import, see docs/import-formats.md). Stock has no history: segments
    "as of" a past date still read today's stock."""

    __tablename__ = "products"
    __table_args__ = (sa.CheckConstraint("price_minor >= 0", name="ck_products_price_nonneg"),
                      sa.CheckConstraint("stock IS NULL OR stock >= 0", name="ck_products_stock_nonneg"))

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    sku: str = Field(max_length=64, unique=True)
    name: str = Field(max_length=200)
    category: str = Field(max_length=64, index=True)
    price_minor: int = Field(sa_type=sa.BigInteger)
    currency: str = Field(default="TWD", max_length=3)
    arrived_at: datetime | None = _ts(nullable=True, default=None)
    stock: int | None = Field(default=None)
    restocked_at: datetime | None = _ts(nullable=True, default=None)


class Order(TableModel, table=True):
    __tablename__ = "orders"
    __table_args__ = (
        sa.CheckConstraint(_in("status", OrderStatus), name="ck_orders_status"),
        sa.CheckConstraint("total_minor >= 0", name="ck_orders_total_nonneg"),
        sa.Index("ix_orders_member_placed", "member_id", "placed_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    external_id: str = Field(max_length=64, unique=True)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    placed_at: datetime = _ts(index=True)
    status: str = Field(default=OrderStatus.PAID.value, max_length=16)
    total_minor: int = Field(sa_type=sa.BigInteger)
    currency: str = Field(default="TWD", max_length=3)
    delivered_at: datetime | None = _ts(nullable=True, default=None)
    updated_at: datetime = _ts(default_factory=utcnow)


class OrderSummary(TableModel, table=True):
    """One row per member with orders: their purchases folded up, kept current by database triggers.

    Maintained by triggers on ``orders`` (every writer: importer, generator, loaders, raw SQL), rebuilt by
    :func:`membercare.order_summary.rebuild`. ``changed_at`` is the latest ``placed_at`` of any of the
    member's orders and ``updated_at`` of their cancelled/refunded ones: the row answers a question
    "as of T" exactly when ``changed_at <= T`` (see :mod:`segments.summary`).
    """

    __tablename__ = "order_summary"

    # The foreign key also makes clear_shop's TRUNCATE ... CASCADE (which fires no row triggers) empty it.
    member_id: int = Field(primary_key=True, foreign_key="members.id", sa_type=ID,
                           sa_column_kwargs={"autoincrement": False})
    orders: int = Field(description="purchases (PURCHASE_STATUSES)")
    spend_minor: int = Field(sa_type=sa.BigInteger, description="sum of total_minor of the purchases")
    first_purchase_at: datetime | None = _ts(nullable=True, default=None)
    last_purchase_at: datetime | None = _ts(nullable=True, default=None)
    first_purchase_days: float | None = Field(default=None, description="epoch days of first_purchase_at")
    last_purchase_days: float | None = Field(default=None, description="epoch days of last_purchase_at")
    changed_at: datetime = _ts(index=True)


class OrderLine(TableModel, table=True):
    __tablename__ = "order_lines"
    __table_args__ = (
        sa.UniqueConstraint("order_id", "line_no", name="uq_order_lines_order_line"),
        sa.CheckConstraint("quantity > 0", name="ck_order_lines_quantity_pos"),
        sa.CheckConstraint("amount_minor >= 0", name="ck_order_lines_amount_nonneg"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    order_id: int = Field(foreign_key="orders.id", sa_type=ID, nullable=False, index=True)
    line_no: int
    product_id: int | None = Field(default=None, foreign_key="products.id", sa_type=ID)
    sku: str = Field(max_length=64)
    category: str = Field(max_length=64, index=True)
    quantity: int
    amount_minor: int = Field(sa_type=sa.BigInteger, description="line total")
    currency: str = Field(default="TWD", max_length=3)


class Coupon(TableModel, table=True):
    __tablename__ = "coupons"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", CouponKind), name="ck_coupons_kind"),
        sa.CheckConstraint(
            "(kind = 'amount' AND amount_minor > 0 AND percent_off IS NULL)"
            " OR (kind = 'percent' AND percent_off > 0 AND percent_off <= 100 AND amount_minor IS NULL)",
            name="ck_coupons_value",
        ),
        sa.CheckConstraint("expires_at > issued_at", name="ck_coupons_expiry_after_issue"),
        sa.Index("ix_coupons_member_expires", "member_id", "expires_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    code: str = Field(max_length=64, unique=True)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    kind: str = Field(max_length=8)
    amount_minor: int | None = Field(default=None, sa_type=sa.BigInteger)
    percent_off: int | None = Field(default=None)
    currency: str = Field(default="TWD", max_length=3)
    min_spend_minor: int = Field(default=0, sa_type=sa.BigInteger)
    issued_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)
    redeemed_at: datetime | None = _ts(nullable=True, default=None)
    redeemed_order_id: int | None = Field(default=None, foreign_key="orders.id", sa_type=ID)
    campaign: str | None = Field(default=None, max_length=64)


class Tier(TableModel, table=True):
    """A membership tier and its rules. ``rank`` 0 is the entry tier.

    A member reaches (or keeps, at renewal) a tier when their purchases over the trailing
    ``window_days`` meet *either* the spend bar or the order-count bar. Renewal bars are usually
    lower than upgrade bars so that members are not downgraded by a single quiet month.
    """

    __tablename__ = "tiers"

    code: str = Field(primary_key=True, max_length=16)
    name: str = Field(max_length=64)
    rank: int = Field(unique=True)
    upgrade_spend_minor: int = Field(default=0, sa_type=sa.BigInteger)
    upgrade_orders: int = Field(default=0)
    renewal_spend_minor: int = Field(default=0, sa_type=sa.BigInteger)
    renewal_orders: int = Field(default=0)
    window_days: int = Field(default=365)
    points_per_100: int = Field(default=1, description="points earned per 100 currency units spent")


class TierHistory(TableModel, table=True):
    __tablename__ = "tier_history"
    __table_args__ = (
        sa.CheckConstraint(_in("reason", TierChangeReason), name="ck_tier_history_reason"),
        sa.UniqueConstraint("member_id", "valid_from", name="uq_tier_history_member_from"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False, index=True)
    tier: str = Field(foreign_key="tiers.code", max_length=16)
    previous_tier: str | None = Field(default=None, max_length=16)
    reason: str = Field(max_length=16)
    valid_from: datetime = _ts()
    valid_to: datetime | None = _ts(nullable=True, default=None)
    decided_at: datetime = _ts(default_factory=utcnow)
    detail: str | None = Field(default=None, max_length=500)


class PointsEntry(TableModel, table=True):
    """Points ledger. ``points`` is signed: earned > 0, spent and expired < 0."""

    __tablename__ = "points_ledger"
    __table_args__ = (
        sa.CheckConstraint(_in("kind", PointsKind), name="ck_points_kind"),
        sa.CheckConstraint(
            "(kind = 'earned' AND points > 0) OR (kind IN ('spent', 'expired') AND points < 0) OR kind = 'adjusted'",
            name="ck_points_sign",
        ),
        sa.Index("ix_points_member_occurred", "member_id", "occurred_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    kind: str = Field(max_length=16)
    points: int
    occurred_at: datetime = _ts()
    expires_at: datetime | None = _ts(nullable=True, default=None)
    order_id: int | None = Field(default=None, foreign_key="orders.id", sa_type=ID)
    # Idempotency: e.g. "order:123:earned"; re-running a points job adds nothing twice.
    dedupe_key: str | None = Field(default=None, max_length=128, unique=True)
    note: str | None = Field(default=None, max_length=200)


class ImportRun(TableModel, table=True):
    """One ``membercare import`` invocation, for the audit trail."""

    __tablename__ = "import_runs"

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    kind: str = Field(max_length=16)
    source_name: str = Field(max_length=500)
    started_at: datetime = _ts(default_factory=utcnow)
    finished_at: datetime | None = _ts(nullable=True, default=None)
    rows_total: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_unchanged: int = 0
    rows_rejected: int = 0
    status: str = Field(default="running", max_length=16)


DEFAULT_TIERS: tuple[dict, ...] = (
    # Bars in TWD minor units (hundredths): gold at NT$10,000 or 6 orders a year, platinum at NT$30,000
    # or 15 orders; renewal at about 70 % of the upgrade bar.
    dict(code="silver", name="Silver", rank=0, upgrade_spend_minor=0, upgrade_orders=0,
         renewal_spend_minor=0, renewal_orders=0, window_days=365, points_per_100=1),
    dict(code="gold", name="Gold", rank=1, upgrade_spend_minor=1_000_000, upgrade_orders=6,
         renewal_spend_minor=700_000, renewal_orders=4, window_days=365, points_per_100=2),
    dict(code="platinum", name="Platinum", rank=2, upgrade_spend_minor=3_000_000, upgrade_orders=15,
         renewal_spend_minor=2_100_000, renewal_orders=10, window_days=365, points_per_100=3),
)
