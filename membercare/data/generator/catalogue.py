"""The product catalogue: categories, products and prices from :mod:`.reference`, popularity per seed; arrival
dates and stock relative to ``as_of``.

Stock and arrivals come from their own random stream, so that adding them left the orders unchanged. The
products of the shop's history arrived before it began (before anyone could order them); on top of them, a
few *new arrivals* (a "Limited Edition" of an existing product, in 8 of the 12 categories) arrived in the
14 days before ``as_of``; they are not drawn for orders, which are all older. About 5 % of the products are
out of stock (``stock`` 0) and about 4 % came back in stock (``restocked_at``) in the last 14 days.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from membercare.data.generator import reference as D
from membercare.data.generator.arrays import fmt_ts
from membercare.data.generator.model import CURRENCY, DAY

NEW_ARRIVAL_CATEGORIES = 8   # categories with one new arrival in the last NEW_ARRIVAL_DAYS
NEW_ARRIVAL_DAYS = 14
OUT_OF_STOCK_SHARE = 0.05
RESTOCKED_SHARE = 0.04
HISTORY_DAYS = 4 * 365       # products of the history arrived at least this long before as_of

_CATEGORY_CODES = {
    "skincare": "SKN", "makeup": "MKP", "haircare": "HAI", "snacks": "SNK", "tea": "TEA", "coffee": "COF",
    "kitchen": "KIT", "home": "HOM", "apparel": "APP", "baby": "BAB", "pet": "PET", "electronics accessories": "ELA",
}


@dataclass
class Catalogue:
    categories: list[str]
    demand: np.ndarray          # relative demand per category
    complement: np.ndarray      # category index -> complementary category index
    product_id: np.ndarray      # per product, grouped by category
    category: np.ndarray
    price: np.ndarray           # minor units
    sku: list[str]
    name: list[str]
    cum: np.ndarray             # category index + within-category cumulative popularity, for searchsorted
    # Per product, epoch seconds (-1: none) and units on hand; set by with_stock (the same length as product_id).
    arrived: np.ndarray | None = None
    stock: np.ndarray | None = None
    restocked: np.ndarray | None = None

    @classmethod
    def build(cls, seed: int, as_of: int | None = None) -> Catalogue:
        """The catalogue of ``seed``; with ``as_of`` (epoch seconds) also arrivals, new arrivals and stock."""
        cat = cls._products(seed)
        return cat if as_of is None else cat.with_stock(seed, as_of)

    @classmethod
    def _products(cls, seed: int) -> Catalogue:
        rng = np.random.default_rng([seed, 0xCA7A])
        cats = list(D.CATALOGUE)
        ids, cat_idx, prices, skus, names, cum = [], [], [], [], [], []
        pid = 1
        for ci, cat in enumerate(cats):
            _, products, variants = D.CATALOGUE[cat]
            items = [(f"{p}{label}", base * f) for p, base in products for label, f in variants]
            # Popularity within a category is Zipf-like, in a seed-dependent order.
            pop = 1.0 / np.arange(1, len(items) + 1) ** 0.9
            pop = pop[rng.permutation(len(items))]
            cw = np.cumsum(pop) / pop.sum()
            cw[-1] = 1.0  # exactly: a draw for category ci must never spill into ci + 1
            cum.extend((ci + cw).tolist())
            for k, (nm, price) in enumerate(items):
                nt = max(10, int(round(price / 10.0)) * 10)
                if nt >= 200 and k % 3 == 1:
                    nt -= 1  # the occasional NT$399
                ids.append(pid)
                cat_idx.append(ci)
                prices.append(nt * 100)
                skus.append(f"{_CATEGORY_CODES[cat]}-{k + 1:03d}")
                names.append(nm)
                pid += 1
        comp: dict[str, str] = {}
        for x, y in D.COMPLEMENTS:
            comp.setdefault(x, y)
            comp.setdefault(y, x)
        cum_arr = np.array(cum)
        return cls(
            categories=cats, demand=np.array([D.CATALOGUE[c][0] for c in cats], dtype=float),
            complement=np.array([cats.index(comp[c]) for c in cats]), product_id=np.array(ids),
            category=np.array(cat_idx), price=np.array(prices, dtype=np.int64), sku=skus, name=names, cum=cum_arr,
        )

    def with_stock(self, seed: int, as_of: int) -> Catalogue:
        """Add the new arrivals (after the products orders are drawn from) and every product's arrival and stock."""
        rng = np.random.default_rng([seed, 0x570C])
        n_old = len(self.product_id)
        ids, cat_idx, prices, skus, names = (self.product_id.tolist(), self.category.tolist(), self.price.tolist(),
                                             list(self.sku), list(self.name))
        for ci in sorted(rng.choice(len(self.categories), NEW_ARRIVAL_CATEGORIES, replace=False).tolist()):
            base = int(rng.choice(np.flatnonzero(self.category[:n_old] == ci)))
            ids.append(ids[-1] + 1)
            cat_idx.append(ci)
            prices.append(int(self.price[base]))
            skus.append(f"{_CATEGORY_CODES[self.categories[ci]]}-N{len(skus) - n_old + 1:02d}")
            names.append(f"{self.name[base]} Limited Edition")
        n = len(ids)
        arrived = as_of - (HISTORY_DAYS + rng.integers(0, 365, n)) * DAY
        # New arrivals: within the last NEW_ARRIVAL_DAYS, at a whole hour.
        arrived[n_old:] = as_of - rng.integers(1, NEW_ARRIVAL_DAYS * 24, n - n_old) * 3600
        stock = rng.integers(5, 300, n)
        restocked = np.full(n, -1, dtype=np.int64)
        u = rng.random(n_old)
        out = np.flatnonzero(u < OUT_OF_STOCK_SHARE)
        back = np.flatnonzero((u >= OUT_OF_STOCK_SHARE) & (u < OUT_OF_STOCK_SHARE + RESTOCKED_SHARE))
        stock[out] = 0
        restocked[back] = as_of - rng.integers(1, NEW_ARRIVAL_DAYS * 24, len(back)) * 3600
        return Catalogue(
            categories=self.categories, demand=self.demand, complement=self.complement, product_id=np.array(ids),
            category=np.array(cat_idx), price=np.array(prices, dtype=np.int64), sku=skus, name=names, cum=self.cum,
            arrived=arrived, stock=stock, restocked=restocked,
        )

    def rows(self) -> list[tuple]:
        """Rows of ``products`` (columns as in :mod:`.writer`)."""
        n = len(self.product_id)
        arrived = fmt_ts(self.arrived) if self.arrived is not None else [None] * n
        stock = self.stock.tolist() if self.stock is not None else [None] * n
        restocked = fmt_ts(self.restocked) if self.restocked is not None else [None] * n
        return [(int(i), s, nm, self.categories[c], int(p), CURRENCY, a, st, r)
                for i, s, nm, c, p, a, st, r in zip(self.product_id, self.sku, self.name, self.category, self.price,
                                                    arrived, stock, restocked, strict=True)]

    def pick(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        """A product index per requested category, by popularity."""
        idx = np.searchsorted(self.cum, category + rng.random(len(category)), side="right")
        return np.minimum(idx, len(self.cum) - 1)
