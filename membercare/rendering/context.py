"""Template contexts, built per batch of members with a handful of set-based queries.

:class:`ContextBuilder` loads, for a batch of member ids, everything the templates use, in six
queries whatever the batch size (members, open coupons, purchase statistics, last orders with their
lines, purchased products, campaign coupons) plus two per run that are cached on the builder (the
tier table and the co-purchase model), and for catalogue campaigns (``recommendations.only``) one more per
batch for the members' category affinity. Never one query per member.

The context of one member (all plain dicts, lists, ints, strings and datetimes)::

    member          id, external_id, name, first_name, locale, timezone, tier, points_balance,
                    birthday, joined_at, region, city, country
    stats           orders_365, spend_365_minor, orders_total, last_order_at, currency
    coupons         open coupons, soonest expiry first: code, kind, amount_minor, percent_off,
                    currency, min_spend_minor, issued_at, expires_at, campaign
    coupon          the coupon this message is about (see ContextBuilder.build), or None
    last_order      the most recent purchase: external_id, placed_at, delivered_at, total_minor,
                    currency, status, lines [{sku, name, category, quantity, amount_minor, url}]
    recent_orders   the last three purchases, newest first (same shape as last_order)
    recent_items    distinct products of the last orders (newest first, up to 6)
    recommendations products to suggest [{sku, name, category, price_minor, currency, url, arrived_at,
                    restocked_at}], within the campaign's ``recommendations:`` rules (membercare.rendering.recommend)
    tier_progress   next tier and what is missing to reach it, or None at the top tier
    offer           the campaign's offer step for this member's value (campaign.yaml ``offer``), or None
    unsubscribe_url, preferences_url   the member's signed links (membercare.links)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.campaigns.definition import Campaign
from membercare.links import LinkScope, LinkSigner
from membercare.models import PURCHASE_STATUSES, Coupon, Member, Order, OrderLine, Product, Tier
from membercare.rendering.recommend import LOOKBACK_DAYS, CoPurchaseModel, Recommender

BATCH = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits
RECENT_ORDERS = 3
# The member fields of a context (``member`` in templates, before ``first_name``), in this order.
MEMBER_FIELDS = ("id", "external_id", "name", "locale", "timezone", "tier", "points_balance", "birthday",
                 "joined_at", "region", "city", "country")


def _chunks(ids: Sequence[int], size: int = BATCH) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def product_view(product: dict, url_pattern: str) -> dict:
    return {
        "sku": product["sku"], "name": product["name"], "category": product["category"],
        "price_minor": product.get("price_minor"), "currency": product.get("currency") or "TWD",
        "url": url_pattern.format(sku=product["sku"]),
        "arrived_at": product.get("arrived_at"), "restocked_at": product.get("restocked_at"),
    }


def tier_progress(tiers: list[dict], current: str, spend_minor: int, orders: int) -> dict | None:
    """How far the member is from the next tier (either bar reaches it), or ``None`` at the top."""
    ranked = sorted(tiers, key=lambda t: t["rank"])
    rank = next((t["rank"] for t in ranked if t["code"] == current), 0)
    nxt = next((t for t in ranked if t["rank"] > rank), None)
    if nxt is None:
        return None
    return {
        "current": current,
        "next": nxt["code"],
        "spend_needed_minor": max(0, nxt["upgrade_spend_minor"] - spend_minor),
        "orders_needed": max(0, nxt["upgrade_orders"] - orders),
        "window_days": nxt["window_days"],
    }


class ContextBuilder:
    """Per-run loader of template contexts for one campaign. Reuse it for every batch of the run."""

    def __init__(self, campaign: Campaign, signer: LinkSigner, shop: dict, *, recommendations: int = 3):
        self.campaign = campaign
        self.signer = signer
        self.shop = shop
        self.n_recommendations = int(campaign.params.get("recommendations", recommendations))
        self.url_pattern = shop.get("product_url") or (str(shop.get("website", "")).rstrip("/") + "/products/{sku}")
        self._model: CoPurchaseModel | None = None
        self._model_as_of: datetime | None = None
        self._recommender: Recommender | None = None
        self._tiers: list[dict] | None = None

    def model(self, conn: Connection, as_of: datetime) -> CoPurchaseModel:
        # One model per run; a run keeps one as_of, so recompute only if it changes by over a day.
        if self._model is None or self._model_as_of is None or abs((as_of - self._model_as_of).total_seconds()) > 86400:
            self._model, self._model_as_of = CoPurchaseModel.load(conn, as_of), as_of
            self._recommender = None
        return self._model

    def recommender(self, conn: Connection, as_of: datetime) -> Recommender:
        """The campaign's recommendation rules over the run's model (both computed once per run)."""
        model = self.model(conn, as_of)
        if self._recommender is None:
            assert self._model_as_of is not None
            self._recommender = Recommender(model, self.campaign.recommendations, self._model_as_of)
        return self._recommender

    def _affinity(self, conn: Connection, ids: Sequence[int], as_of: datetime) -> dict[int, dict[str, int]]:
        """Category affinity (purchases and product views) of a batch, as the catalogue segments define it."""
        from segments.base import SegmentContext
        from segments.catalogue import affinity

        aff = affinity(SegmentContext(conn, as_of), days=LOOKBACK_DAYS, member_ids=ids)
        out: dict[int, dict[str, int]] = defaultdict(dict)
        for mid, cat, strength in conn.execute(sa.select(aff.c.member_id, aff.c.category, aff.c.strength)):
            out[mid][cat] = int(strength)
        return out

    def tiers(self, conn: Connection) -> list[dict]:
        if self._tiers is None:
            self._tiers = [dict(r._mapping) for r in conn.execute(sa.select(Tier.__table__))]
        return self._tiers

    def build(self, conn: Connection, member_ids: Sequence[int], as_of: datetime) -> dict[int, dict]:
        """Contexts by member id (members that do not exist are left out).

        ``coupon`` is, for campaigns with ``message_per: coupon``, the member's soonest-expiring
        open coupon (use :func:`with_coupon` to pick another); otherwise the newest open coupon
        issued by this campaign (e.g. the birthday coupon), or ``None``.
        """
        out: dict[int, dict] = {}
        ids = list(dict.fromkeys(member_ids))
        for chunk in _chunks(ids):
            out.update(self._build_chunk(conn, chunk, as_of))
        return out

    def _build_chunk(self, conn: Connection, ids: Sequence[int], as_of: datetime) -> dict[int, dict]:
        m, c, o, ol, p = Member.__table__, Coupon.__table__, Order.__table__, OrderLine.__table__, Product.__table__
        # Only the columns a context shows (MEMBER_FIELDS): no addresses, no bookkeeping timestamps to decode.
        members = [dict(zip(MEMBER_FIELDS, r, strict=True)) for r in conn.execute(
            sa.select(*(m.c[k] for k in MEMBER_FIELDS)).where(m.c.id.in_(ids))).tuples()]
        if not members:
            return {}
        # Plain tuples, zipped with the column names: a RowMapping per row costs more than the dict built from it.
        coupons: dict[int, list[dict]] = defaultdict(list)
        coupon_cols = (c.c.code, c.c.kind, c.c.amount_minor, c.c.percent_off, c.c.currency, c.c.min_spend_minor,
                       c.c.issued_at, c.c.expires_at, c.c.campaign)
        coupon_keys = [col.key for col in coupon_cols]
        for member_id, *values in conn.execute(
            sa.select(c.c.member_id, *coupon_cols)
            .where(c.c.member_id.in_(ids), c.c.redeemed_at.is_(None), c.c.expires_at > as_of, c.c.issued_at <= as_of)
            .order_by(c.c.member_id, c.c.expires_at, c.c.id)
        ).tuples():
            coupons[member_id].append(dict(zip(coupon_keys, values, strict=True)))

        since = as_of - timedelta(days=LOOKBACK_DAYS)
        purchase = sa.and_(o.c.member_id.in_(ids), o.c.status.in_(PURCHASE_STATUSES), o.c.placed_at <= as_of)
        in_window = o.c.placed_at >= since
        stats = {r.member_id: r for r in conn.execute(
            sa.select(o.c.member_id,
                      sa.func.count().label("orders_total"),
                      sa.func.count().filter(in_window).label("orders_365"),
                      sa.func.coalesce(sa.func.sum(o.c.total_minor).filter(in_window), 0).label("spend_365_minor"),
                      sa.func.max(o.c.placed_at).label("last_order_at"))
            .where(purchase).group_by(o.c.member_id))}

        # The last few orders per member, with their lines (one window-function query).
        rn = sa.func.row_number().over(partition_by=o.c.member_id, order_by=(o.c.placed_at.desc(), o.c.id.desc()))
        recent = sa.select(o.c.id, o.c.member_id, o.c.external_id, o.c.placed_at, o.c.delivered_at, o.c.status,
                           o.c.total_minor, o.c.currency, rn.label("rn")).where(purchase).subquery()
        orders: dict[int, dict[int, dict]] = defaultdict(dict)
        url_pattern = self.url_pattern
        for (order_id, member_id, external_id, placed_at, delivered_at, status, total_minor, currency,
             sku, category, quantity, amount_minor, product_id, product_name) in conn.execute(
            sa.select(recent.c.id, recent.c.member_id, recent.c.external_id, recent.c.placed_at,
                      recent.c.delivered_at, recent.c.status, recent.c.total_minor, recent.c.currency,
                      ol.c.sku, ol.c.category, ol.c.quantity, ol.c.amount_minor, ol.c.product_id, p.c.name)
            .select_from(recent.outerjoin(ol, ol.c.order_id == recent.c.id).outerjoin(p, p.c.id == ol.c.product_id))
            .where(recent.c.rn <= RECENT_ORDERS)
            .order_by(recent.c.member_id, recent.c.rn, ol.c.line_no)
        ).tuples():
            member_orders = orders[member_id]
            order = member_orders.get(order_id)
            if order is None:
                order = member_orders[order_id] = {
                    "external_id": external_id, "placed_at": placed_at, "delivered_at": delivered_at,
                    "status": status, "total_minor": total_minor, "currency": currency, "lines": []}
            if sku is not None:
                order["lines"].append({
                    "sku": sku, "name": product_name or sku, "category": category,
                    "quantity": quantity, "amount_minor": amount_minor,
                    "url": url_pattern.format(sku=sku), "product_id": product_id})

        bought: dict[int, list[int]] = defaultdict(list)
        cats: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for member_id, product_id, category, n in conn.execute(
            sa.select(o.c.member_id, ol.c.product_id, ol.c.category, sa.func.count())
            .join(ol, ol.c.order_id == o.c.id).where(purchase, in_window)
            .group_by(o.c.member_id, ol.c.product_id, ol.c.category)
        ):
            if product_id is not None:
                bought[member_id].append(product_id)
            cats[member_id][category] += n

        rec = self.recommender(conn, as_of) if self.n_recommendations else None
        # Only catalogue campaigns rank by affinity (views included): one more query per batch, for them alone.
        affinity = self._affinity(conn, ids, as_of) if rec is not None and rec.restricted else {}
        tiers = self.tiers(conn)
        out = {}
        for row in members:
            mid = row["id"]
            st = stats.get(mid)
            fav = sorted(cats[mid], key=lambda k: (-cats[mid][k], k))[:2]
            recs = []
            if rec is not None:
                recs = [product_view(rec.model.products[pid], self.url_pattern)
                        for pid in rec.recommend(bought[mid], self.n_recommendations, affinity.get(mid, {}), fav)]
            out[mid] = self.assemble(
                member=row, coupons=coupons.get(mid, []), orders=list(orders.get(mid, {}).values()),
                stats={
                    "orders_total": int(st.orders_total) if st else 0,
                    "orders_365": int(st.orders_365) if st else 0,
                    "spend_365_minor": int(st.spend_365_minor) if st else 0,
                    "last_order_at": st.last_order_at if st else None,
                    "favourite_categories": fav,
                },
                recommendations=recs, tiers=tiers)
        return out

    def assemble(self, *, member: dict, coupons: list[dict], orders: list[dict], stats: dict,
                 recommendations: list[dict], tiers: list[dict]) -> dict[str, Any]:
        """The context of one member from already loaded rows (also used by the sample contexts)."""
        mid = member["id"]
        name = (member.get("name") or "").strip()
        view = {k: member.get(k) for k in MEMBER_FIELDS}
        view["first_name"] = name.split()[0] if name and " " in name else name
        stats = {**stats, "currency": (orders[0]["currency"] if orders else self.shop.get("currency", "TWD"))}
        seen, recent_items = set(), []
        for order in orders:
            for it in order["lines"]:
                if it["sku"] not in seen:
                    seen.add(it["sku"])
                    recent_items.append(it)
        if self.campaign.per_coupon:
            coupon = coupons[0] if coupons else None
        else:
            own = [c for c in coupons if c.get("campaign") == self.campaign.name]
            coupon = max(own, key=lambda c: c["issued_at"]) if own else None
        offer = None
        if self.campaign.offer is not None:
            step = self.campaign.offer.for_spend(stats["spend_365_minor"])
            if self.campaign.offer.size_by == "cltv" and coupon is not None:
                # Sized by lifetime value at planning (offers.py): the issued coupon carries the tier's value.
                step = next((t for t in self.campaign.offer.tiers if t.amount_minor == coupon.get("amount_minor")
                             and t.percent_off == coupon.get("percent_off")), step)
            offer = {"kind": self.campaign.offer.kind.value, "amount_minor": step.amount_minor,
                     "percent_off": step.percent_off, "currency": self.campaign.offer.currency,
                     "min_spend_minor": self.campaign.offer.min_spend_minor,
                     "valid_days": self.campaign.offer.valid_days, "label": step.label}
        unsubscribe_url, preferences_url = self.signer.member_urls(mid)
        return {
            "member": view,
            "stats": stats,
            "coupons": coupons,
            "coupon": coupon,
            "last_order": orders[0] if orders else None,
            "recent_orders": orders,
            "recent_items": recent_items[:6],
            "recommendations": recommendations,
            "tier_progress": tier_progress(tiers, member.get("tier") or "silver", stats["spend_365_minor"],
                                           stats["orders_365"]),
            "offer": offer,
            "unsubscribe_url": unsubscribe_url,
            "preferences_url": preferences_url,
            "email_unsubscribe_url": self.signer.unsubscribe_url(mid, LinkScope.EMAIL),
        }


def with_coupon(context: dict, code: str) -> dict:
    """A copy of ``context`` whose ``coupon`` is the member's open coupon ``code`` (per-coupon campaigns)."""
    for c in context["coupons"]:
        if c["code"] == code:
            return {**context, "coupon": c}
    raise KeyError(f"member has no open coupon {code!r}")


def with_order(context: dict, external_id: str) -> dict:
    """A copy of ``context`` whose ``last_order`` is order ``external_id`` (``message_per: order`` campaigns).

    The order must be one of the member's last three purchases (``recent_orders``), which holds for
    campaigns triggered shortly after an order event.
    """
    for o in context["recent_orders"]:
        if o["external_id"] == external_id:
            return {**context, "last_order": o}
    raise KeyError(f"order {external_id!r} is not among the member's recent purchases")
