"""Conversion attribution: which message earned which order (and coupon redemption).

A **conversion** is

* an order in a purchase state (:data:`membercare.models.PURCHASE_STATUSES`: placed, paid, shipped,
  delivered; never cancelled or refunded), at ``placed_at``, carrying its ``total_minor`` as revenue; or
* a coupon redemption at ``redeemed_at`` (whose order, if recorded, is a purchase). It carries no
  revenue: the money is the order's, and counting it twice would inflate revenue.

A **touch** is an engagement event with our message id on a marketing message (``outbox_messages``):

==============  ================================================  ===============================
touch level     email / push event kinds                          SMS event kinds
==============  ================================================  ===============================
``clicked``     ``clicked``, ``push_opened`` (a tap)              ``clicked`` (tracked links only)
``opened``      the above plus ``opened``                         as ``clicked``
``delivered``   the above plus ``delivered``, ``push_received``   plus ``delivered``
==============  ================================================  ===============================

The level is set per channel. Default: ``opened`` for email and push, ``delivered`` for SMS, because an
SMS has no open signal (handsets do not report reads) and SMS is read within minutes almost always.

A touch qualifies for a conversion of the same member when ``touched_at <= converted_at <
touched_at + window`` (default 7 days): half-open, so a conversion exactly at the window's end does not
count, and one at the very instant of the touch does. **Last touch** (default) credits the latest
qualifying touch; **first touch** the earliest; ties go to the later event id. One conversion gets
exactly one credited message per model.

**Holdout credit** (model ``holdout``): a holdout member's outbox row (``variant = 'holdout'``, planned
but never sent) is credited with every conversion of that member in the window after its
``scheduled_at``, the moment the message would have gone out. This is the holdout arm of the lift
comparison; the report computes the treated arm the same way (intent to treat, see docs/reports.md).

Everything is computed in SQL (``INSERT ... SELECT`` with a ``ROW_NUMBER()`` window), for conversions
in ``[since, until)``: the rows of that range are deleted and inserted again in one transaction, so a
recompute gives the same rows and reflects later changes (a refund removes the credit).

Timestamps on SQLite are compared at millisecond resolution (SQLite's date arithmetic is in
milliseconds); PostgreSQL compares exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import is_sqlite
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import HOLDOUT
from membercare.engagement.attribution_models import Attribution, AttributionModel, ConversionType
from membercare.engagement.events import EventKind
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import PURCHASE_STATUSES, Channel, Coupon, Order, Purpose
from membercare.timeutil import ensure_utc, utcnow

DEFAULT_WINDOW = timedelta(days=7)


class TouchLevel(StrEnum):
    CLICKED = "clicked"
    OPENED = "opened"
    DELIVERED = "delivered"


_CLICK_KINDS = (EventKind.CLICKED.value, EventKind.PUSH_OPENED.value)
_OPEN_KINDS = (*_CLICK_KINDS, EventKind.OPENED.value)
_DELIVERY_KINDS = (*_OPEN_KINDS, EventKind.DELIVERED.value, EventKind.PUSH_RECEIVED.value)
TOUCH_KINDS: dict[TouchLevel, tuple[str, ...]] = {
    TouchLevel.CLICKED: _CLICK_KINDS,
    TouchLevel.OPENED: _OPEN_KINDS,
    TouchLevel.DELIVERED: _DELIVERY_KINDS,
}


def default_touch() -> dict[str, TouchLevel]:
    # LINE reports no delivery or read for pushes: its touches are taps (postbacks) and tracked-link clicks.
    return {Channel.EMAIL.value: TouchLevel.OPENED, Channel.PUSH.value: TouchLevel.OPENED,
            Channel.SMS.value: TouchLevel.DELIVERED, Channel.LINE.value: TouchLevel.CLICKED}


@dataclass(frozen=True)
class AttributionSettings:
    """What counts as a touch, for how long it earns credit, and which touch wins.

    ``touch`` maps a channel to its :class:`TouchLevel`; :meth:`with_level` sets every channel at once.
    ``purposes``: the messages that can earn credit (marketing only by default: an order confirmation
    that was opened did not cause the order).
    """

    window: timedelta = DEFAULT_WINDOW
    model: AttributionModel = AttributionModel.LAST_TOUCH
    touch: Mapping[str, TouchLevel] = field(default_factory=default_touch)
    purposes: tuple[str, ...] = (Purpose.MARKETING.value,)
    holdout: bool = True  # also compute holdout credit

    def __post_init__(self) -> None:
        if self.window <= timedelta(0):
            raise InputError("the attribution window must be positive")
        model = AttributionModel(self.model)
        if model is AttributionModel.HOLDOUT:
            raise InputError("the touch model must be last_touch or first_touch")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "touch", {Channel(ch).value: TouchLevel(lv) for ch, lv in self.touch.items()})

    def with_level(self, level: TouchLevel | str) -> AttributionSettings:
        from dataclasses import replace

        return replace(self, touch={ch.value: TouchLevel(level) for ch in Channel})

    @property
    def window_seconds(self) -> int:
        return int(self.window.total_seconds())


@dataclass
class AttributionResult:
    since: datetime
    until: datetime
    deleted: int = 0
    orders: int = 0  # order conversions credited by the touch model
    coupons: int = 0  # coupon redemptions credited by the touch model
    revenue_minor: int = 0
    holdout: int = 0  # holdout credit rows


# ---------------------------------------------------------------------------------------------------------------------
# Dialect helpers


def _epoch_ms(col):
    """Milliseconds since the epoch of a stored timestamp (SQLite: its text, through julianday)."""
    return sa.cast(sa.func.round((sa.func.julianday(col) - 2440587.5) * 86400000.0), sa.BigInteger)


def within_window(conn: Connection, converted_at: sa.ColumnElement[datetime],
                  touched_at: sa.ColumnElement[datetime], seconds: int) -> sa.ColumnElement[bool]:
    """``touched_at <= converted_at < touched_at + seconds``, exact on PostgreSQL, to the ms on SQLite.

    SQLite stores timestamps as text; comparing text against ``datetime(x, '+7 days')`` would mix two
    formats (with and without microseconds), so both sides become integer milliseconds.
    """
    if is_sqlite(conn):
        c, t = _epoch_ms(converted_at), _epoch_ms(touched_at)
        return sa.and_(c >= t, c < t + int(seconds) * 1000)
    return sa.and_(converted_at >= touched_at,
                   converted_at < touched_at + sa.literal_column(f"interval '{int(seconds)} seconds'"))


def _minus(when: datetime, seconds: int) -> datetime:
    return when - timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------------------------------
# The computation


def conversions_query(since: datetime, until: datetime) -> sa.CompoundSelect:
    """Orders in a purchase state and coupon redemptions (on a purchase, or without a recorded order)."""
    o, c = Order.__table__, Coupon.__table__
    orders = sa.select(
        sa.literal(ConversionType.ORDER.value).label("conversion_type"), o.c.id.label("conversion_id"),
        o.c.id.label("order_id"), sa.null().label("coupon_id"), o.c.member_id, o.c.placed_at.label("converted_at"),
        o.c.total_minor.label("revenue_minor"), o.c.currency,
    ).where(o.c.status.in_(PURCHASE_STATUSES), o.c.placed_at >= since, o.c.placed_at < until)
    ro = o.alias("redeemed_order")
    coupons = sa.select(
        sa.literal(ConversionType.COUPON.value).label("conversion_type"), c.c.id.label("conversion_id"),
        c.c.redeemed_order_id.label("order_id"), c.c.id.label("coupon_id"), c.c.member_id,
        c.c.redeemed_at.label("converted_at"), sa.literal(0, sa.BigInteger).label("revenue_minor"), c.c.currency,
    ).select_from(c.outerjoin(ro, ro.c.id == c.c.redeemed_order_id)).where(
        c.c.redeemed_at.is_not(None), c.c.redeemed_at >= since, c.c.redeemed_at < until,
        sa.or_(c.c.redeemed_order_id.is_(None), ro.c.status.in_(PURCHASE_STATUSES)),
    )
    return sa.union_all(orders, coupons)


def touches_query(settings: AttributionSettings, since: datetime, until: datetime) -> sa.Select:
    """Qualifying engagement events joined to their outbox rows (which carry member, campaign, variant)."""
    e, m = EngagementEventRow.__table__, OutboxMessage.__table__
    by_channel = [sa.and_(e.c.channel == ch, e.c.kind.in_(TOUCH_KINDS[lv]))
                  for ch, lv in sorted(settings.touch.items())]
    return sa.select(
        e.c.id.label("event_id"), e.c.kind.label("touch_kind"), e.c.occurred_at.label("touched_at"),
        e.c.channel, m.c.message_id, m.c.member_id, m.c.run_id, m.c.campaign, m.c.occurrence, m.c.variant,
    ).select_from(e.join(m, m.c.message_id == e.c.message_id)).where(
        e.c.message_id.is_not(None),
        e.c.occurred_at >= _minus(since, settings.window_seconds), e.c.occurred_at < until,
        m.c.purpose.in_(settings.purposes),
        sa.or_(*by_channel) if by_channel else sa.false(),
    )


_COLUMNS = ("model", "conversion_type", "conversion_id", "order_id", "coupon_id", "member_id", "converted_at",
            "revenue_minor", "currency", "message_id", "run_id", "campaign", "occurrence", "channel", "variant",
            "touch_kind", "touched_at", "window_seconds", "computed_at")


def _touch_select(conn: Connection, settings: AttributionSettings, since: datetime, until: datetime,
                  now: datetime) -> sa.Select:
    conv = conversions_query(since, until).subquery("conv")
    touch = touches_query(settings, since, until).subquery("touch")
    newest_first = settings.model is AttributionModel.LAST_TOUCH
    order = ([touch.c.touched_at.desc(), touch.c.event_id.desc()] if newest_first
             else [touch.c.touched_at.asc(), touch.c.event_id.desc()])
    ranked = sa.select(
        conv.c.conversion_type, conv.c.conversion_id, conv.c.order_id, conv.c.coupon_id, conv.c.member_id,
        conv.c.converted_at, conv.c.revenue_minor, conv.c.currency, touch.c.message_id, touch.c.run_id,
        touch.c.campaign, touch.c.occurrence, touch.c.channel, touch.c.variant, touch.c.touch_kind,
        touch.c.touched_at,
        sa.func.row_number().over(partition_by=[conv.c.conversion_type, conv.c.conversion_id],
                                  order_by=order).label("rn"),
    ).select_from(conv.join(touch, sa.and_(
        touch.c.member_id == conv.c.member_id,
        within_window(conn, conv.c.converted_at, touch.c.touched_at, settings.window_seconds),
    ))).subquery("ranked")
    return sa.select(
        sa.literal(settings.model.value).label("model"), ranked.c.conversion_type, ranked.c.conversion_id,
        ranked.c.order_id, ranked.c.coupon_id, ranked.c.member_id, ranked.c.converted_at, ranked.c.revenue_minor,
        ranked.c.currency, ranked.c.message_id, ranked.c.run_id, ranked.c.campaign, ranked.c.occurrence,
        ranked.c.channel, ranked.c.variant, ranked.c.touch_kind, ranked.c.touched_at,
        sa.literal(settings.window_seconds).label("window_seconds"),
        sa.literal(now, Attribution.__table__.c.computed_at.type).label("computed_at"),
    ).where(ranked.c.rn == 1)


def _holdout_select(conn: Connection, settings: AttributionSettings, since: datetime, until: datetime,
                    now: datetime) -> sa.Select:
    conv = conversions_query(since, until).subquery("conv")
    m = OutboxMessage.__table__
    return sa.select(
        sa.literal(AttributionModel.HOLDOUT.value).label("model"), conv.c.conversion_type, conv.c.conversion_id,
        conv.c.order_id, conv.c.coupon_id, conv.c.member_id, conv.c.converted_at, conv.c.revenue_minor,
        conv.c.currency, m.c.message_id, m.c.run_id, m.c.campaign, m.c.occurrence, sa.null().label("channel"),
        m.c.variant, sa.literal(HOLDOUT).label("touch_kind"), m.c.scheduled_at.label("touched_at"),
        sa.literal(settings.window_seconds).label("window_seconds"),
        sa.literal(now, Attribution.__table__.c.computed_at.type).label("computed_at"),
    ).select_from(conv.join(m, sa.and_(
        m.c.member_id == conv.c.member_id, m.c.variant == HOLDOUT,
        m.c.scheduled_at >= _minus(since, settings.window_seconds), m.c.scheduled_at < until,
        m.c.purpose.in_(settings.purposes),
        within_window(conn, conv.c.converted_at, m.c.scheduled_at, settings.window_seconds),
    )))


def compute_attributions(bind: Engine | Connection, since: datetime, until: datetime,
                         settings: AttributionSettings | None = None) -> AttributionResult:
    """(Re)compute the credit of every conversion in ``[since, until)`` for ``settings.model`` (and holdouts).

    Idempotent: the range's rows of those models are replaced in one transaction. Pass a connection to
    run inside the caller's transaction.
    """
    settings = settings or AttributionSettings()
    since, until = ensure_utc(since), ensure_utc(until)
    if until <= since:
        raise InputError("the attribution range is empty: until must be after since")
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return _compute(conn, settings, since, until)
    return _compute(bind, settings, since, until)


def _compute(conn: Connection, settings: AttributionSettings, since: datetime, until: datetime) -> AttributionResult:
    a = Attribution.__table__
    now = utcnow()
    result = AttributionResult(since, until)
    models = [settings.model.value] + ([AttributionModel.HOLDOUT.value] if settings.holdout else [])
    result.deleted = conn.execute(sa.delete(a).where(
        a.c.model.in_(models), a.c.converted_at >= since, a.c.converted_at < until)).rowcount or 0
    cols = [a.c[name] for name in _COLUMNS]
    conn.execute(sa.insert(a).from_select(cols, _touch_select(conn, settings, since, until, now)))
    if settings.holdout:
        conn.execute(sa.insert(a).from_select(cols, _holdout_select(conn, settings, since, until, now)))
    for model, ctype, rows, revenue in conn.execute(
        sa.select(a.c.model, a.c.conversion_type, sa.func.count(), sa.func.coalesce(sa.func.sum(a.c.revenue_minor), 0))
        .where(a.c.model.in_(models), a.c.converted_at >= since, a.c.converted_at < until)
        .group_by(a.c.model, a.c.conversion_type)
    ):
        if model == AttributionModel.HOLDOUT:
            result.holdout += rows
        elif ctype == ConversionType.ORDER:
            result.orders, result.revenue_minor = rows, int(revenue)
        else:
            result.coupons = rows
    return result


__all__ = [
    "AttributionModel", "AttributionResult", "AttributionSettings", "ConversionType", "DEFAULT_WINDOW",
    "TOUCH_KINDS", "TouchLevel", "compute_attributions", "conversions_query", "default_touch", "touches_query",
    "within_window",
]
