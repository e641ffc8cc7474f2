"""Catalogue segments: members with an affinity for a category that has new arrivals or products back in stock.

*Affinity* for a category: the member bought in it (a purchase, see :func:`segments.standard.purchases`)
within ``affinity_days`` before as_of, or viewed one of its products (``product.viewed`` member events whose
properties name a ``sku`` of the catalogue or a ``category``) in that window. *Available*: ``stock`` is
unknown (NULL) or above 0. A *new arrival*: ``arrived_at`` within ``days`` before as_of (not after it);
*back in stock*: ``restocked_at`` within ``days`` before as_of. Stock has no history, so a past as_of still
reads today's stock.

:func:`affinity` is shared with the template contexts (membercare.rendering.context), so the products a
message names are those that selected its member.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from membercare.journeys.models import MemberEvent
from membercare.models import Member, OrderLine, Product
from segments.base import Param, SegmentContext, segment
from segments.standard import _csv, is_member, o, purchases

p = Product.__table__
ol = OrderLine.__table__
ev = MemberEvent.__table__
m = Member.__table__
VIEW_EVENT = "product.viewed"


def _json_text(dialect: str, column: sa.ColumnElement, key: str) -> sa.ColumnElement:
    """A top-level text property of a JSON text column (member_events.properties)."""
    if dialect == "postgresql":
        return sa.func.json_extract_path_text(sa.cast(column, sa.JSON), key)
    return sa.func.json_extract(column, f"$.{key}")


def affinity(ctx: SegmentContext, *, days: int, views: bool = True,
             member_ids: Sequence[int] | None = None) -> sa.Subquery:
    """``(member_id, category, strength)``: purchase lines plus product views per member and category."""
    bought = (sa.select(o.c.member_id, ol.c.category.label("category"), sa.literal(1).label("w"))
              .join_from(ol, o, o.c.id == ol.c.order_id).where(*purchases(ctx, since_days=days)))
    if member_ids is not None:
        bought = bought.where(o.c.member_id.in_(list(member_ids)))
    parts = [bought]
    if views:
        sku = _json_text(ctx.dialect, ev.c.properties, "sku")
        category = sa.func.coalesce(p.c.category, _json_text(ctx.dialect, ev.c.properties, "category"))
        viewed = (sa.select(ev.c.member_id, category.label("category"), sa.literal(1).label("w"))
                  .select_from(ev.outerjoin(p, p.c.sku == sku))
                  .where(ev.c.name == VIEW_EVENT, ev.c.occurred_at <= ctx.as_of_lit,
                         ev.c.occurred_at > ctx.days_ago(days)))
        if member_ids is not None:
            viewed = viewed.where(ev.c.member_id.in_(list(member_ids)))
        parts.append(viewed)
    both = sa.union_all(*parts).subquery("affinity_lines")
    return (sa.select(both.c.member_id, both.c.category, sa.func.sum(both.c.w).label("strength"))
            .where(both.c.category.is_not(None)).group_by(both.c.member_id, both.c.category).subquery("affinity"))


def available() -> sa.ColumnElement:
    return sa.or_(p.c.stock.is_(None), p.c.stock > 0)


def _fresh(ctx: SegmentContext, column: sa.ColumnElement, days: int, categories: str | None) -> sa.Subquery:
    where = [column <= ctx.as_of_lit, column > ctx.days_ago(days), available()]
    if categories:
        where.append(p.c.category.in_(_csv(categories)))
    return sa.select(p.c.id, p.c.category, column.label("at")).where(*where).subquery("fresh")


def _catalogue_segment(ctx: SegmentContext, prm: dict, column: sa.ColumnElement, label: str) -> sa.Select:
    aff = affinity(ctx, days=prm["affinity_days"], views=prm["views"])
    fresh = _fresh(ctx, column, prm["days"], prm["category"])
    return (
        sa.select(aff.c.member_id,
                  sa.func.count(sa.distinct(fresh.c.category)).label("categories"),
                  sa.func.count(sa.distinct(fresh.c.id)).label(f"{label}_products"),
                  sa.func.max(fresh.c.at).label(f"last_{label}_at"))
        .select_from(aff.join(fresh, fresh.c.category == aff.c.category).join(m, m.c.id == aff.c.member_id))
        .where(is_member(ctx))
        .group_by(aff.c.member_id)
    )


_COMMON = (
    Param("affinity_days", int, 365, "affinity: bought (or viewed) in the category within this many days",
          min=1, max=3650),
    Param("views", bool, True, "count product.viewed events as affinity"),
    Param("category", str, None, "only these categories (comma-separated); default every category"),
)


@segment(
    "new_arrivals",
    "Members with an affinity for a category (bought in it, or viewed its products, within `affinity_days`) "
    "that has available new arrivals: products whose arrived_at is within `days` days before as_of.",
    Param("days", int, 14, "arrived within this many days before as_of", min=1, max=365),
    *_COMMON,
)
def new_arrivals(ctx: SegmentContext, prm: dict) -> sa.Select:
    return _catalogue_segment(ctx, prm, p.c.arrived_at, "arrived")


@segment(
    "back_in_stock",
    "Members with an affinity for a category (bought in it, or viewed its products, within `affinity_days`) "
    "that has products back in stock: restocked_at within `days` days before as_of, and stock not 0.",
    Param("days", int, 7, "restocked within this many days before as_of", min=1, max=365),
    *_COMMON,
)
def back_in_stock(ctx: SegmentContext, prm: dict) -> sa.Select:
    return _catalogue_segment(ctx, prm, p.c.restocked_at, "restocked")
