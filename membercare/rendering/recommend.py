"""Product recommendations for template contexts: the co-purchase model and the campaign's restrictions.

Everything that does not depend on the member is computed once per run (:meth:`CoPurchaseModel.load` and
:class:`Recommender`): the co-purchase neighbours, best-sellers, and the *pool* of products the campaign
may recommend. Per member, only a short ranking over that pool is left.

The pool (``campaign.yaml`` ``recommendations:``, see :class:`~membercare.campaigns.definition.Recommendations`):

* never a product that is out of stock (``stock`` 0; unknown stock counts as available), nor one that has
  not arrived yet (``arrived_at`` after as_of);
* with ``category``: only products of those categories;
* with ``only: new_arrivals``: only products that arrived within ``within_days`` before as_of (and not after
  it); ``only: back_in_stock``: only products restocked within ``within_days``.

The ranking, ``only: any``: products bought together with the member's purchases (cosine co-purchase
similarity), then best-sellers of the member's favourite categories, then best-sellers of the campaign's
categories (or of the shop, without ``category``), then the pool's products nobody bought yet, newest arrival
first. A campaign with ``category`` therefore never leaves it: when the category has fewer available
products than requested, the list is shorter (possibly empty; templates use ``{% if recommendations %}``).

``only: new_arrivals`` / ``back_in_stock``: the pool's products in the categories the member has an affinity
for (bought, or viewed when ``product.viewed`` events exist), the member's strongest category first and the
newest product first within it. A member with no such affinity (a test send, a preview for another member)
gets the pool's newest products, so that the message still names what is new.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.campaigns.definition import Recommendations
from membercare.models import PURCHASE_STATUSES, Order, OrderLine, Product
from membercare.timeutil import ensure_utc

LOOKBACK_DAYS = 365
MEMO_MAX = 20_000  # rankings a Recommender remembers (see Recommender.recommend)


@dataclass
class CoPurchaseModel:
    """Item-to-item co-occurrence ("bought together") from order lines, computed in SQL once per run.

    Similarity is the cosine of the order-incidence vectors, ``n(a,b) / sqrt(n(a) * n(b))``, which
    keeps best-sellers from being everyone's top recommendation. A member's candidates are scored by
    the summed similarity to what they bought; gaps are filled with best-sellers of their favourite
    categories, then overall best-sellers.
    """

    neighbours: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    products: dict[int, dict] = field(default_factory=dict)
    bestsellers: list[int] = field(default_factory=list)  # product ids, most orders first
    by_category: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, conn: Connection, as_of: datetime, *, lookback_days: int = LOOKBACK_DAYS,
             min_support: int = 2, top_k: int = 20) -> CoPurchaseModel:
        o, a, b, p = Order.__table__, OrderLine.__table__.alias("a"), OrderLine.__table__.alias("b"), Product.__table__
        since = as_of - timedelta(days=lookback_days)
        window = sa.and_(o.c.status.in_(PURCHASE_STATUSES), o.c.placed_at >= since, o.c.placed_at <= as_of)
        counts = dict(conn.execute(
            sa.select(a.c.product_id, sa.func.count(sa.distinct(a.c.order_id)))
            .join(o, o.c.id == a.c.order_id).where(window, a.c.product_id.is_not(None)).group_by(a.c.product_id)
        ).tuples().all())
        pairs = conn.execute(
            sa.select(a.c.product_id, b.c.product_id, sa.func.count(sa.distinct(a.c.order_id)))
            .select_from(a.join(b, sa.and_(a.c.order_id == b.c.order_id, a.c.product_id != b.c.product_id))
                         .join(o, o.c.id == a.c.order_id))
            .where(window, a.c.product_id.is_not(None), b.c.product_id.is_not(None))
            .group_by(a.c.product_id, b.c.product_id)
            .having(sa.func.count(sa.distinct(a.c.order_id)) >= min_support)
        ).all()
        neigh: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for x, y, n in pairs:
            neigh[x].append((y, n / math.sqrt(counts[x] * counts[y])))
        neighbours = {x: sorted(v, key=lambda t: (-t[1], t[0]))[:top_k] for x, v in neigh.items()}
        products = {r.id: dict(r._mapping) for r in conn.execute(
            sa.select(p.c.id, p.c.sku, p.c.name, p.c.category, p.c.price_minor, p.c.currency,
                      p.c.arrived_at, p.c.stock, p.c.restocked_at))}
        best = sorted((pid for pid in counts if pid in products), key=lambda pid: (-counts[pid], pid))
        by_cat: dict[str, list[int]] = defaultdict(list)
        for pid in best:
            by_cat[products[pid]["category"]].append(pid)
        return cls(neighbours, products, best, dict(by_cat))

    def recommend(self, bought: Sequence[int], n: int, categories: Sequence[str] = (), *,
                  pool: set[int] | None = None, fill: Sequence[Sequence[int]] | None = None) -> list[int]:
        """Up to ``n`` product ids for a member who bought ``bought``; only ids in ``pool`` when given.

        Gaps are filled from the best-sellers of ``categories``, then from ``fill`` (default: the shop's
        best-sellers).
        """
        owned = set(bought)
        scores: dict[int, float] = defaultdict(float)
        for pid in owned:
            for other, sim in self.neighbours.get(pid, ()):
                if other not in owned and (pool is None or other in pool):
                    scores[other] += sim
        # The n best by (score descending, id): what sorting them all and keeping n gives, without the sort.
        ranked = [(-score, pid) for pid, score in scores.items()]
        picked = [pid for _, pid in (heapq.nsmallest(n, ranked) if n >= 0 else sorted(ranked)[:n])]
        rest = fill if fill is not None else [self.bestsellers]
        pools = [*(self.by_category.get(c, ()) for c in categories), *rest]
        for candidates in pools:
            for pid in candidates:
                if len(picked) >= n:
                    return picked
                if pid not in owned and pid not in picked and (pool is None or pid in pool):
                    picked.append(pid)
        return picked


def _in_window(at: datetime | None, as_of: datetime, days: int) -> bool:
    return at is not None and as_of - timedelta(days=days) < ensure_utc(at) <= as_of


class Recommender:
    """The campaign's recommendation rules over one run's :class:`CoPurchaseModel` (see the module doc)."""

    def __init__(self, model: CoPurchaseModel, rules: Recommendations, as_of: datetime):
        self.model, self.rules, self.as_of = model, rules, ensure_utc(as_of)
        cats = set(rules.category)
        pool = set()
        for pid, p in model.products.items():
            if p.get("stock") == 0 or (cats and p["category"] not in cats):
                continue
            if p.get("arrived_at") is not None and ensure_utc(p["arrived_at"]) > self.as_of:
                continue  # not offered yet
            if rules.only == "new_arrivals" and not _in_window(p.get("arrived_at"), self.as_of, rules.within_days):
                continue
            if rules.only == "back_in_stock" and not _in_window(p.get("restocked_at"), self.as_of,
                                                                 rules.within_days):
                continue
            pool.add(pid)
        self.pool = pool
        # Within a category and overall: the newest first (arrival or restock, by what the campaign is about).
        key = "restocked_at" if rules.only == "back_in_stock" else "arrived_at"
        newest = sorted(pool, key=lambda pid: (-_ts(model.products[pid].get(key)), pid))
        self.newest = newest
        self.newest_by_category: dict[str, list[int]] = defaultdict(list)
        for pid in newest:
            self.newest_by_category[model.products[pid]["category"]].append(pid)
        sold = set(model.bestsellers)
        unsold_newest = [pid for pid in newest if pid not in sold]
        if cats:
            self.fill = [*(model.by_category.get(c, ()) for c in rules.category), unsold_newest]
        else:
            self.fill = [model.bestsellers, unsold_newest]
        # The candidate lists narrowed to the pool once per run: the model's ranking would skip the other
        # products anyway, and for every member (the shop's best-sellers include every sold-out product).
        self._fill_in_pool = [[pid for pid in c if pid in pool] for c in self.fill]
        self._category_in_pool: dict[str, list[int]] = {}
        # Rankings by (what the member bought, how many, favourite categories): many members share one
        # (everyone who bought nothing in the window gets the same list). Bounded, for million-member runs.
        self._memo: dict[tuple[tuple[int, ...], int, tuple[str, ...]], tuple[int, ...]] = {}

    def _in_pool(self, category: str) -> list[int]:
        got = self._category_in_pool.get(category)
        if got is None:
            got = self._category_in_pool[category] = [pid for pid in self.model.by_category.get(category, ())
                                                       if pid in self.pool]
        return got

    @property
    def restricted(self) -> bool:
        return self.rules.only != "any"

    def recommend(self, bought: Sequence[int], n: int, affinity: Mapping[str, int],
                  favourites: Sequence[str] = ()) -> list[int]:
        """Up to ``n`` product ids for one member; ``affinity`` is the member's category -> strength."""
        if not self.restricted:
            key = (tuple(bought), n, tuple(favourites))
            got = self._memo.get(key)
            if got is None:
                # The same candidates in the same order as categories=favourites, fill=self.fill, less
                # the products outside the pool that the ranking would skip.
                fill = [*(self._in_pool(c) for c in favourites), *self._fill_in_pool]
                got = tuple(self.model.recommend(bought, n, (), pool=self.pool, fill=fill))
                if len(self._memo) < MEMO_MAX:
                    self._memo[key] = got
            return list(got)
        picked: list[int] = []
        for cat in sorted(affinity, key=lambda c: (-affinity[c], c)):
            for pid in self.newest_by_category.get(cat, ()):
                if len(picked) >= n:
                    return picked
                picked.append(pid)
        if not picked:
            picked = self.newest[:n]
        return picked


def _ts(at: datetime | None) -> float:
    return ensure_utc(at).timestamp() if at is not None else float("-inf")
