"""The demo shop generator: a realistic, reproducible shop for demos, tests and benchmarks.

``generate_shop(engine, members=N, seed=S, as_of=T)`` fills a fresh database with N members and
everything the rest of the product reads: consents (history and current state), push devices, a
product catalogue, orders with lines, coupons, tiers with their history, and a points ledger.

Reproducibility
    The same ``(seed, as_of, members)`` gives byte-identical tables, ids included. Nothing reads the
    wall clock: ``as_of`` is the shop's "now" and every timestamp is generated relative to it (so
    that today's segments have members: birthdays today, coupons expiring in the next 1-3 days,
    members who joined in the last days, churn risk). Members are generated in fixed blocks of
    :data:`BLOCK` members, each with its own random generator seeded from ``(seed, block index)``;
    ids are assigned in member order. The data therefore does **not** depend on ``batch_size``,
    which only sets how many members go into one database transaction.

Statistical model (see :class:`ShopModel` for the knobs)
    Purchases follow the BG/NBD "buy till you die" story: each buyer has a Poisson purchase rate
    ``lambda ~ Gamma(r, alpha)`` (per day) and, after every purchase, drops out for good with
    probability ``p ~ Beta(a, b)``. The defaults give about five orders per member, a large share
    of one-time buyers, a tail of loyal repeaters and many members who bought regularly and then
    stopped (churned). Baskets draw categories from a per-member affinity (Dirichlet) plus
    complementary-category pairs; tiers, points and coupons are derived from the orders so that
    they are mutually consistent (tier matches trailing-12-month purchases against the ``tiers``
    table; ``points_balance`` equals the ledger sum; a redeemed coupon points at an order placed
    while it was valid).

Speed and memory
    Rows are built column-wise with numpy and written per batch of members in one transaction: an
    ``executemany`` of plain tuples on SQLite, ``COPY ... FROM STDIN`` on PostgreSQL, from a writer
    thread while the next batch is generated. Values are pre-formatted in the exact form the model
    types store (timestamps as SQLAlchemy's SQLite ``DATETIME`` text, which PostgreSQL also parses
    in a UTC session), because per-value bind processing would cost more than the inserts; the
    tests read the rows back through the models' types on both backends. At most three batches
    exist at a time (being generated, queued, being written), so a million members run in
    bounded memory. Ids are explicit; PostgreSQL's identity sequences are moved past them at the end.

Compatibility
    Byte-identical output is promised for the same code and numpy version (numpy documents that
    its distributions' streams may change between versions).

This package never touches the wall clock or global random state, and writes consent rows exactly as
:func:`membercare.consent.record_consents` would (history plus folded current state), except that
``recorded_at`` equals ``occurred_at`` (the generator "records" each statement when it happens).
"""

from __future__ import annotations

from membercare.data.generator.model import (
    BLOCK,
    DEFAULT_MODEL,
    SHOP_TABLES,
    SHOP_TIMEZONE,
    GenerationSummary,
    ShopModel,
)
from membercare.data.generator.shop import clear_shop, default_as_of, generate_shop

__all__ = [
    "BLOCK",
    "DEFAULT_MODEL",
    "SHOP_TABLES",
    "SHOP_TIMEZONE",
    "GenerationSummary",
    "ShopModel",
    "clear_shop",
    "default_as_of",
    "generate_shop",
]
