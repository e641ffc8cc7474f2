"""The catalogue kind: products by SKU, with arrival date and stock (a full catalogue or a stock feed).

Only ``sku`` is required, so that a daily stock file (``sku,stock``) updates stock alone; a SKU not yet in
the catalogue needs ``name``, ``category`` and ``price``. ``restocked_at`` is set to the import's time when
a product's stored stock is 0 and the file gives it more (unless the row states ``restocked_at`` itself):
that is what back-in-stock campaigns look for.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare import validation as v
from membercare.data.importer.handler import MAX_INT32, UNCHANGED, Context, Handler, Unit, classify
from membercare.db import insert_for
from membercare.models import Product

# Columns a new product must have (the catalogue cannot hold a product without them).
NEW_PRODUCT_COLUMNS = ("name", "category", "price_minor")
COMPARED = ("name", "category", "price_minor", "currency", "arrived_at", "stock", "restocked_at")


class ProductsHandler(Handler):
    kind = "products"
    required = ("sku",)
    optional = ("name", "category", "price", "currency", "arrived_at", "stock", "restocked_at")
    key_column = "sku"
    free_text = ("name",)

    def parse(self, unit: Unit, ctx: Context) -> dict:
        vals, present = unit.rows[0].values, ctx.present
        tz = ctx.settings.shop_timezone
        p: dict[str, Any] = dict(sku=v.bounded_text(vals["sku"], field="sku", max_length=64, required=True))
        # An empty name, category or price would erase what the catalogue needs: refused, not guessed.
        if "name" in present:
            p["name"] = v.bounded_text(vals.get("name", ""), field="name", max_length=200, required=True)
        if "category" in present:
            p["category"] = v.bounded_text(vals.get("category", ""), field="category", max_length=64, required=True)
        if "price" in present:
            if not vals.get("price"):
                raise v.ValidationError("price is required")
            p["price_minor"] = v.parse_amount_minor(vals["price"], field="price")
        if "currency" in present:
            p["currency"] = (v.normalise_currency(vals["currency"]) if vals.get("currency")
                             else ctx.settings.shop_currency)
        if "arrived_at" in present:
            # A future arrival (an announced launch) is allowed: segments see it from that day on.
            p["arrived_at"] = (v.parse_datetime_utc(vals["arrived_at"], tz, field="arrived_at")
                               if vals.get("arrived_at") else None)
        if "stock" in present:
            # Empty: the shop does not know (treated as available), not 0.
            p["stock"] = (v.parse_int(vals["stock"], field="stock", min_value=0, max_value=MAX_INT32)
                          if vals.get("stock") else None)
        if vals.get("restocked_at"):
            p["restocked_at"] = v.not_in_future(v.parse_datetime_utc(vals["restocked_at"], tz, field="restocked_at"),
                                                field="restocked_at", now=ctx.now)
        return p

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        if not units:
            return
        t = Product.__table__
        keys = [u.parsed["sku"] for u in units]
        existing = {r["sku"]: r for r in conn.execute(sa.select(t).where(t.c.sku.in_(keys))).mappings()}
        defaults = dict(currency=ctx.settings.shop_currency, arrived_at=None, stock=None, restocked_at=None)
        writes = []
        for u in units:
            p, old = u.parsed, existing.get(u.parsed["sku"])
            if old is None:
                missing = [c.removesuffix("_minor") for c in NEW_PRODUCT_COLUMNS if c not in p]
                if missing:
                    u.reject_all(f"sku {v.quoted(p['sku'])} is not in the catalogue yet: a new product needs "
                                 f"{', '.join(missing)}")
                    continue
            elif ("restocked_at" not in p and old["stock"] == 0 and p.get("stock") is not None
                  and p["stock"] > 0):
                p["restocked_at"] = ctx.now
            record = {c: p[c] for c in COMPARED if c in p}
            u.outcome, row = classify(record, old, COMPARED, defaults)
            if u.outcome != UNCHANGED:
                writes.append({"sku": p["sku"], **row})
        if writes:
            ins = insert_for(conn, t)
            conn.execute(ins.on_conflict_do_update(index_elements=["sku"],
                                                   set_={c: ins.excluded[c] for c in COMPARED}),
                         sorted(writes, key=lambda r: r["sku"]))  # a stable lock order for concurrent imports
