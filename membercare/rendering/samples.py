"""Sample template contexts: realistic members for previews, the gallery and the pre-flight check.

Each locale gets a *typical* member and a *worst case* (the longest plausible name, several coupons,
the largest amounts), so that the check catches an SMS or push that only overflows for some members.
Contexts are assembled by :meth:`ContextBuilder.assemble`, the same code that builds contexts from the
database, so their shape cannot drift from what real sends see.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from membercare.models import DEFAULT_TIERS
from membercare.rendering.context import ContextBuilder, product_view
from membercare.timeutil import UTC

SAMPLE_AS_OF = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)  # 10:00 in Taipei

_PRODUCTS = {
    "zh-TW": [
        ("KIT-0102", "手沖咖啡入門組", "coffee", 129000),
        ("BEAN-0310", "衣索比亞耶加雪菲淺焙咖啡豆 250g", "coffee", 52000),
        ("MUG-0021", "職人手作陶瓷馬克杯", "kitchen", 68000),
        ("TEA-0440", "阿里山高山烏龍茶禮盒", "tea", 158000),
        ("TOWEL-0007", "有機棉浴巾兩入組", "home", 99000),
    ],
    "en": [
        ("KIT-0102", "Pour-Over Coffee Starter Kit", "coffee", 129000),
        ("BEAN-0310", "Ethiopia Yirgacheffe Light Roast Beans 250g", "coffee", 52000),
        ("MUG-0021", "Handmade Ceramic Mug", "kitchen", 68000),
        ("TEA-0440", "Alishan High Mountain Oolong Gift Box", "tea", 158000),
        ("TOWEL-0007", "Organic Cotton Bath Towels, Set of Two", "home", 99000),
    ],
}

_MEMBERS = {
    ("zh-TW", "typical"): dict(id=900001, external_id="SAMPLE-ZH-1", name="王小明", tier="gold", points_balance=2380),
    ("zh-TW", "worst"): dict(id=900002, external_id="SAMPLE-ZH-2", name="歐陽娜娜美", tier="silver",
                             points_balance=123456),
    ("en", "typical"): dict(id=900003, external_id="SAMPLE-EN-1", name="Emily Chen", tier="gold", points_balance=2380),
    ("en", "worst"): dict(id=900004, external_id="SAMPLE-EN-2", name="Maximilian Alexander Montgomery-Whitfield",
                          tier="silver", points_balance=123456),
}

SAMPLE_VARIANTS = ("typical", "worst")


def sample_context(builder: ContextBuilder, locale: str, variant: str = "typical",
                   as_of: datetime = SAMPLE_AS_OF) -> dict:
    """A complete context for a sample member of ``locale`` (``typical`` or ``worst``)."""
    lang_key = "zh-TW" if locale.startswith("zh") else "en"
    base = _MEMBERS[(lang_key, variant)]
    worst = variant == "worst"
    member = {
        **base, "locale": locale, "timezone": "Asia/Taipei", "country": "TW",
        "birthday": date(1990, as_of.month, as_of.day), "joined_at": as_of - timedelta(days=3),
        "region": "北部" if lang_key == "zh-TW" else "North", "city": "台北市" if lang_key == "zh-TW" else "Taipei",
    }
    products: list[dict[str, Any]] = [
        dict(zip(("sku", "name", "category", "price_minor"), p, strict=True), currency="TWD")
        for p in _PRODUCTS[lang_key]]
    url = builder.url_pattern
    amount = 99_999_00 if worst else 200_00
    coupons = [{
        "code": "BDAY-7Q4M-2KXA" if worst else "GD-8F3K2Q", "kind": "amount", "amount_minor": amount,
        "percent_off": None, "currency": "TWD", "min_spend_minor": 1_500_00 if worst else 1_000_00,
        "issued_at": as_of - timedelta(days=20), "expires_at": as_of + timedelta(days=3),
        "campaign": builder.campaign.name,
    }]
    if worst:
        coupons.append({
            "code": "VIP15-ZZ9W", "kind": "percent", "amount_minor": None, "percent_off": 15, "currency": "TWD",
            "min_spend_minor": 0, "issued_at": as_of - timedelta(days=5), "expires_at": as_of + timedelta(days=29),
            "campaign": None,
        })
    items: list[dict[str, Any]] = [
        {**products[0], "quantity": 1, "amount_minor": products[0]["price_minor"],
         "url": url.format(sku=products[0]["sku"]), "product_id": 1},
        {**products[1], "quantity": 2, "amount_minor": 2 * products[1]["price_minor"],
         "url": url.format(sku=products[1]["sku"]), "product_id": 2},
    ]
    for it in items:
        it.pop("price_minor", None)
        it.pop("currency", None)
    order = {
        "external_id": "SO-20261106-0042", "placed_at": as_of - timedelta(days=14),
        "delivered_at": as_of - timedelta(days=7), "status": "delivered",
        "total_minor": sum(i["amount_minor"] for i in items), "currency": "TWD", "lines": items,
    }
    spend = 8_620_00 if not worst else 29_990_00
    stats = {"orders_total": 7 if not worst else 42, "orders_365": 5 if not worst else 14, "spend_365_minor": spend,
             "last_order_at": order["placed_at"], "favourite_categories": ["coffee", "kitchen"]}
    recs = [product_view(p, url) for p in _sample_recommendations(builder, products, as_of)]
    ctx = builder.assemble(member=member, coupons=coupons, orders=[order], stats=stats,
                           recommendations=recs, tiers=[dict(t) for t in DEFAULT_TIERS])
    return ctx


def _sample_recommendations(builder: ContextBuilder, products: list[dict[str, Any]],
                            as_of: datetime) -> list[dict[str, Any]]:
    """Sample products that obey the campaign's ``recommendations:`` rules, as a real run's would."""
    rules = builder.campaign.recommendations
    recs = products[2:]
    if rules.category:
        # The samples' own products of that category, else the others relabelled (a category we have no sample of).
        recs = ([p for p in products if p["category"] in rules.category]
                or [{**p, "category": rules.category[0]} for p in products[2:]])
    if rules.only == "new_arrivals":
        recs = [{**p, "arrived_at": as_of - timedelta(days=2 + i)} for i, p in enumerate(recs)]
    elif rules.only == "back_in_stock":
        recs = [{**p, "restocked_at": as_of - timedelta(days=1 + i)} for i, p in enumerate(recs)]
    return recs[: builder.n_recommendations or len(recs)]
