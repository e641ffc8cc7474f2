"""Planning fast paths give what the plain paths give (issue 18: cheaper planning)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from membercare.campaigns.definition import Recommendations
from membercare.links import LinkScope, LinkSigner
from membercare.rendering.bounded import BoundedEnvironment
from membercare.rendering.recommend import CoPurchaseModel, Recommender

AS_OF = datetime(2026, 11, 23, 2, tzinfo=UTC)


@pytest.mark.parametrize("template", [
    "{{ m.name }}|{{ m.missing is undefined }}|{{ m.items is defined }}|{{ m.get('name') }}",
    "{{ m['name'] }}|{{ m.keys() | list | length }}|{{ m.nested.inner }}|{{ m.nested.nope is undefined }}",
    "{{ m.items() | list | length }}|{{ m.values is defined }}|{{ m.__class__ is undefined }}",
])
def test_dict_attribute_lookup_matches_the_sandbox(template):
    # "items"/"keys" are keys here as well as dict methods: the method wins, as in Jinja's sandbox.
    m = {"name": "Ann", "items": "a key", "keys": "another key", "nested": {"inner": 3}}
    want = ImmutableSandboxedEnvironment().from_string(template).render(m=m)
    assert BoundedEnvironment().from_string(template).render(m=m) == want


def test_member_urls_are_the_single_link_methods():
    signer = LinkSigner(secret="s3cret", public_url="https://shop.example")
    assert signer.member_urls(42) == (signer.unsubscribe_url(42, LinkScope.ALL), signer.preferences_url(42))


def _model(rng: random.Random) -> CoPurchaseModel:
    cats = ["a", "b", "c", "d"]
    products = {pid: {"id": pid, "sku": f"S{pid}", "name": f"P{pid}", "category": rng.choice(cats),
                      "price_minor": 100, "currency": "TWD", "stock": rng.choice([0, 1, 5, None]),
                      "arrived_at": AS_OF - timedelta(days=rng.randint(-5, 60)),
                      "restocked_at": rng.choice([None, AS_OF - timedelta(days=rng.randint(0, 30))])}
                for pid in range(1, 120)}
    neighbours = {pid: sorted(((rng.randint(1, 119), round(rng.random(), 2)) for _ in range(rng.randint(0, 20))),
                              key=lambda t: (-t[1], t[0])) for pid in products}
    best = rng.sample(list(products), 80)
    by_cat: dict[str, list[int]] = {}
    for pid in best:
        by_cat.setdefault(products[pid]["category"], []).append(pid)
    return CoPurchaseModel(neighbours, products, best, by_cat)


@pytest.mark.parametrize("rules", [Recommendations(), Recommendations(category=["a", "c"])])
def test_recommender_matches_the_models_plain_ranking(rules):
    rng = random.Random(18)
    model = _model(rng)
    rec = Recommender(model, rules, AS_OF)
    for _ in range(400):
        bought = rng.sample(range(1, 120), rng.choice([0, 0, 1, 3, 8]))
        favourites = rng.sample(["a", "b", "c", "d", "z"], rng.randint(0, 2))
        n = rng.choice([1, 3, 6])
        want = model.recommend(bought, n, favourites, pool=rec.pool, fill=rec.fill)
        assert rec.recommend(bought, n, {}, favourites) == want
        assert rec.recommend(bought, n, {}, favourites) == want  # remembered


def test_ranking_takes_the_best_scores_then_the_lowest_ids():
    model = CoPurchaseModel({1: [(5, 0.5), (3, 0.5), (4, 0.9), (2, 0.1)]}, {}, [9, 8], {})
    assert model.recommend([1], 3) == [4, 3, 5]
    assert model.recommend([1], 6) == [4, 3, 5, 2, 9, 8]
