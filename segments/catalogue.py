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
    if dialect == "duckdb":  # the benchmark's reference engine: its json_extract_path_text returns JSON
        return sa.func.json_extract_string(column, f"$.{key}")
    return sa.func.json_extract(column, f"$.{key}")


def _affinity_lines(ctx: SegmentContext, *, days: int, views: bool, member_ids: Sequence[int] | None,
                    categories: Sequence[str] | None) -> list[sa.Select]:
    """``(member_id, category)`` per purchase line and per product view in the window."""
    bought = (sa.select(o.c.member_id, ol.c.category.label("category"))
              .join_from(ol, o, o.c.id == ol.c.order_id).where(*purchases(ctx, since_days=days)))
    if member_ids is not None:
        bought = bought.where(o.c.member_id.in_(list(member_ids)))
    if categories is not None:
        bought = bought.where(ol.c.category.in_(list(categories)))
    parts = [bought]
    if views:
        sku = _json_text(ctx.dialect, ev.c.properties, "sku")
        category = sa.func.coalesce(p.c.category, _json_text(ctx.dialect, ev.c.properties, "category"))
        viewed = (sa.select(ev.c.member_id, category.label("category"))
                  .select_from(ev.outerjoin(p, p.c.sku == sku))
                  .where(ev.c.name == VIEW_EVENT, ev.c.occurred_at <= ctx.as_of_lit,
                         ev.c.occurred_at > ctx.days_ago(days)))
        if member_ids is not None:
            viewed = viewed.where(ev.c.member_id.in_(list(member_ids)))
        if categories is not None:
            viewed = viewed.where(category.in_(list(categories)))
        parts.append(viewed)
    return parts


def affinity(ctx: SegmentContext, *, days: int, views: bool = True,
             member_ids: Sequence[int] | None = None) -> sa.Subquery:
    """``(member_id, category, strength)``: purchase lines plus product views per member and category."""
    lines = _affinity_lines(ctx, days=days, views=views, member_ids=member_ids, categories=None)
    both = sa.union_all(*[q.add_columns(sa.literal(1).label("w")) for q in lines]).subquery("affinity_lines")
    return (sa.select(both.c.member_id, both.c.category, sa.func.sum(both.c.w).label("strength"))
            .where(both.c.category.is_not(None)).group_by(both.c.member_id, both.c.category).subquery("affinity"))


def available() -> sa.ColumnElement:
    return sa.or_(p.c.stock.is_(None), p.c.stock > 0)


def _catalogue_segment(ctx: SegmentContext, prm: dict, column: sa.ColumnElement, label: str) -> sa.Select:
    cols = (sa.literal(0).label("categories"), sa.literal(0).label(f"{label}_products"),
            sa.cast(sa.null(), column.type).label(f"last_{label}_at"))
    # The fresh products are few: read them first, so that the member side is one pass over the window's
    # order lines (and views) of those categories only, with per-category facts inlined as CASE constants.
    where = [column <= ctx.as_of_lit, column > ctx.days_ago(prm["days"]), available()]
    if prm["category"]:
        where.append(p.c.category.in_(_csv(prm["category"])))
    per_cat: dict[str, tuple[int, object]] = {}
    for cat, n, last in ctx.conn.execute(
            sa.select(p.c.category, sa.func.count(), sa.func.max(column)).where(*where).group_by(p.c.category)):
        per_cat[cat] = (int(n), last)
    if not per_cat:
        ctx.notes.append(f"no available products with {column.name} within {prm['days']} days before as_of")
        return ctx.empty(*cols)
    cats = sorted(per_cat)
    pairs = sa.union(*_affinity_lines(ctx, days=prm["affinity_days"], views=prm["views"], member_ids=None,
                                      categories=cats)).subquery("pairs")  # UNION: distinct (member, category)
    n_products = sa.case({c: per_cat[c][0] for c in cats}, value=pairs.c.category, else_=0)
    last_at = sa.case({c: sa.literal(per_cat[c][1], column.type) for c in cats}, value=pairs.c.category)
    return (
        sa.select(pairs.c.member_id,
                  sa.func.count().label("categories"),
                  sa.func.sum(n_products).label(f"{label}_products"),
                  sa.func.max(last_at).label(f"last_{label}_at"))
        .join_from(pairs, m, m.c.id == pairs.c.member_id)
        .where(is_member(ctx))
        .group_by(pairs.c.member_id)
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
