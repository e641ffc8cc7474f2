"""The product catalogue: categories, products and prices from :mod:`.reference`, popularity per seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from membercare.data.generator import reference as D
from membercare.data.generator.model import CURRENCY

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

    @classmethod
    def build(cls, seed: int) -> Catalogue:
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

    def rows(self) -> list[tuple]:
        return [(int(i), s, n, self.categories[c], int(p), CURRENCY)
                for i, s, n, c, p in zip(self.product_id, self.sku, self.name, self.category, self.price, strict=True)]

    def pick(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        """A product index per requested category, by popularity."""
        idx = np.searchsorted(self.cum, category + rng.random(len(category)), side="right")
        return np.minimum(idx, len(self.cum) - 1)
