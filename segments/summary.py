"""Per-member purchase statistics at ``as_of``, read from ``order_summary`` where it is exact.

``order_summary`` (see :mod:`membercare.order_summary`) folds each member's *current* purchases, over all
time. Segments ask "as of T". The rule that makes one answer the other exactly, per member:

    a member's summary row answers ``as_of`` iff ``changed_at <= as_of``, i.e. none of their orders was
    placed after ``as_of`` and none of their cancelled/refunded orders was last touched after ``as_of``.

Then the orders placed by ``as_of`` are all their orders, and the purchases "at as_of" are their current
purchases under both definitions in use (the segments' current status, and RFM's
:func:`segments.rfm.purchases_as_of`, which also counts an order refunded after ``as_of``: such an order
makes ``changed_at`` later than ``as_of``). Members whose row does not answer are aggregated from their
orders as before, found through the ``changed_at`` index. Evaluating "now" thus reads one row per member;
a date in the past reads the summary for members who have been quiet since and the orders of the others,
and is exact either way (``tests/test_segments_summary.py`` compares both paths at several dates).

Contexts whose ``use_order_summary`` attribute is false aggregate every member from ``orders`` (the
benchmark's raw-orders reference does this).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from membercare.models import Order, OrderSummary
from segments import sqlfn
from segments.base import SegmentContext

o = Order.__table__
s = OrderSummary.__table__

# The columns of :func:`purchase_stats`.
STATS_COLUMNS = ("member_id", "orders", "spend_minor", "first_purchase_at", "last_purchase_at",
                 "first_purchase_days", "last_purchase_days")


@dataclass
class AllOrdersContext(SegmentContext):
    """A context whose segments aggregate every member from ``orders`` (the reference the summary must equal)."""

    use_order_summary: bool = False


def uses_summary(ctx: SegmentContext) -> bool:
    return bool(getattr(ctx, "use_order_summary", True))


def _from_orders(ctx: SegmentContext, where: list[sqlfn.Sql]) -> sa.Select:
    first, last = sa.func.min(o.c.placed_at), sa.func.max(o.c.placed_at)
    return sa.select(
        o.c.member_id, sa.func.count().label("orders"), sa.func.sum(o.c.total_minor).label("spend_minor"),
        first.label("first_purchase_at"), last.label("last_purchase_at"),
        ctx.epoch_days(first).label("first_purchase_days"), ctx.epoch_days(last).label("last_purchase_days"),
    ).where(*where).group_by(o.c.member_id)


def purchase_stats(ctx: SegmentContext, where: list[sqlfn.Sql], *, name: str = "stats",
                   lifetime: bool = True) -> sa.Subquery:
    """One row per member with a purchase at ``ctx.as_of`` (columns :data:`STATS_COLUMNS`).

    ``where`` selects the purchases from ``orders`` (the definition in force): it is applied to the members
    the summary cannot answer, and must agree with the summary for the others (see the module docstring).
    ``lifetime=False`` says ``where`` also restricts the time range (a trailing window): orders only.
    """
    if not (lifetime and uses_summary(ctx)):
        return _from_orders(ctx, where).subquery(name)
    # Nearly every row is quiet since as_of when evaluating "now": scan the table, not the index.
    quiet = sqlfn.mostly_true(ctx.dialect, s.c.changed_at <= ctx.as_of_lit)
    answered = sa.select(*(s.c[c] for c in STATS_COLUMNS)).where(quiet, s.c.orders > 0)
    active = sa.select(s.c.member_id).where(sqlfn.mostly_true(ctx.dialect, s.c.changed_at > ctx.as_of_lit, 0.01))
    rest = _from_orders(ctx, [o.c.member_id.in_(active), *where])
    return sa.union_all(answered, rest).subquery(name)


__all__ = ["AllOrdersContext", "STATS_COLUMNS", "purchase_stats", "uses_summary"]
