"""The commerce kinds: orders (with their lines and the product catalogue) and coupons."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare import validation as v
from membercare.data.importer.handler import (
    MAX_INT32,
    UNCHANGED,
    UPDATED,
    Context,
    Handler,
    Unit,
    attach_members,
    classify,
    optional_cell,
    required_cell,
    upsert_simple,
)
from membercare.db import insert_for
from membercare.models import Coupon, CouponKind, Order, OrderLine, OrderStatus, Product


class OrdersHandler(Handler):
    """One row per order line; all lines of an order are consecutive and accepted or rejected together."""

    kind = "orders"
    required = ("order_id", "member_id", "placed_at", "status", "line_no", "sku", "product_name", "category",
                "quantity", "line_amount")
    optional = ("currency", "unit_price", "delivered_at")
    key_column = "order_id"
    groups_lines = True
    free_text = ("product_name",)
    order_columns = ("member_id", "placed_at", "status", "currency", "delivered_at")

    def parse(self, unit: Unit, ctx: Context) -> dict | None:
        first = unit.rows[0]
        order_ext = first.values.get("order_id", "")
        errors: dict[int, str] = {}
        lines: list[dict] = []
        seen_line_no: dict[int, int] = {}
        head: dict[str, Any] | None = None
        for row in unit.rows:
            try:
                if row.error:
                    raise v.ValidationError(row.error)
                vals = row.values
                if row is not first:
                    for c in self.order_columns:
                        if vals.get(c, "") != first.values.get(c, ""):
                            raise v.ValidationError(
                                f"{c} {v.quoted(vals.get(c, ''))} differs from line {first.line} "
                                f"of order {v.quoted(order_ext)}")
                if head is None:
                    head = self._parse_head(vals, ctx)
                line_no = v.parse_int(vals["line_no"], field="line_no", min_value=1, max_value=MAX_INT32)
                if line_no in seen_line_no:
                    raise v.ValidationError(
                        f"duplicate line_no {line_no} in order {v.quoted(order_ext)} "
                        f"(first on line {seen_line_no[line_no]})")
                seen_line_no[line_no] = row.line
                quantity = v.parse_int(vals["quantity"], field="quantity", min_value=1, max_value=MAX_INT32)
                amount = v.parse_amount_minor(vals["line_amount"], field="line_amount")
                unit_price = (v.parse_amount_minor(vals["unit_price"], field="unit_price")
                              if vals.get("unit_price") else None)
                lines.append(dict(
                    line_no=line_no,
                    sku=v.bounded_text(vals["sku"], field="sku", max_length=64, required=True),
                    product_name=v.bounded_text(vals["product_name"], field="product_name", max_length=200,
                                                required=True),
                    category=v.bounded_text(vals["category"], field="category", max_length=64, required=True),
                    quantity=quantity, amount_minor=amount, unit_price_minor=unit_price,
                ))
            except v.ValidationError as exc:
                errors[row.line] = str(exc)
        if errors:
            # An order with a bad line cannot be imported partially: its total would be wrong.
            bad = min(errors)
            for row in unit.rows:
                errors.setdefault(row.line, f"order {v.quoted(order_ext)} rejected because of line {bad}")
            unit.rejects.update(errors)
            return None
        assert head is not None
        head["lines"] = lines
        return head

    def _parse_head(self, vals: dict[str, str], ctx: Context) -> dict:
        return dict(
            external_id=v.bounded_text(vals["order_id"], field="order_id", max_length=64, required=True),
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            placed_at=v.parse_datetime(required_cell(vals, "placed_at"), field="placed_at"),
            status=v.parse_enum(required_cell(vals, "status"), OrderStatus, field="status"),
            currency=v.normalise_currency(vals["currency"]) if vals.get("currency") else ctx.settings.shop_currency,
            delivered_at=(v.parse_datetime(vals["delivered_at"], field="delivered_at")
                          if vals.get("delivered_at") else None),
        )

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        units = attach_members(conn, units)
        kept = []
        for u in units:
            p = u.parsed
            try:
                p["placed_at"] = v.not_in_future(v.localise(p["placed_at"], p["tz"], field="placed_at"),
                                                 field="placed_at", now=ctx.now)
                if p["delivered_at"] is not None:
                    p["delivered_at"] = v.not_in_future(v.localise(p["delivered_at"], p["tz"], field="delivered_at"),
                                                        field="delivered_at", now=ctx.now)
                    if p["delivered_at"] < p["placed_at"]:
                        raise v.ValidationError("delivered_at is before placed_at")
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            p["total_minor"] = sum(ln["amount_minor"] for ln in p["lines"])
            kept.append(u)
        if not kept:
            return
        product_ids = self._upsert_products(conn, kept)

        o, ol = Order.__table__, OrderLine.__table__
        keys = [u.parsed["external_id"] for u in kept]
        existing = {r["external_id"]: r for r in conn.execute(sa.select(o).where(o.c.external_id.in_(keys))).mappings()}
        existing_lines: dict[int, set[tuple]] = {}
        if existing:
            ids = [r["id"] for r in existing.values()]
            for r in conn.execute(sa.select(ol).where(ol.c.order_id.in_(ids))).mappings():
                existing_lines.setdefault(r["order_id"], set()).add(self._line_tuple(r))

        compared = ("member_id", "placed_at", "status", "total_minor", "currency", "delivered_at")
        writes, changed = [], []
        for u in kept:
            p = u.parsed
            for ln in p["lines"]:
                ln["product_id"] = product_ids[ln["sku"]]
                ln["currency"] = p["currency"]
            record = {c: p[c] for c in compared}
            old = existing.get(p["external_id"])
            u.outcome, _ = classify(record, old, compared, {})
            # UNCHANGED implies a stored order (old); its lines decide whether it really is unchanged.
            if u.outcome == UNCHANGED and old is not None and existing_lines.get(old["id"], set()) != {
                self._line_tuple(ln) for ln in p["lines"]
            }:
                u.outcome = UPDATED
            if u.outcome != UNCHANGED:
                writes.append({"external_id": p["external_id"], **record, "updated_at": ctx.now})
                changed.append(u)
        if not writes:
            return
        ins = insert_for(conn, o)
        stmt = ins.on_conflict_do_update(
            index_elements=["external_id"], set_={c: ins.excluded[c] for c in (*compared, "updated_at")}
        ).returning(o.c.id, o.c.external_id)
        order_ids = {r.external_id: r.id for r in conn.execute(stmt, writes)}
        # Lines of a changed order are replaced as a set; nothing references order_lines rows by id.
        updated_ids = [order_ids[u.parsed["external_id"]] for u in changed if u.outcome == UPDATED]
        if updated_ids:
            conn.execute(ol.delete().where(ol.c.order_id.in_(updated_ids)))
        conn.execute(
            ol.insert(),
            [
                dict(order_id=order_ids[u.parsed["external_id"]], line_no=ln["line_no"], product_id=ln["product_id"],
                     sku=ln["sku"], category=ln["category"], quantity=ln["quantity"], amount_minor=ln["amount_minor"],
                     currency=ln["currency"])
                for u in changed
                for ln in u.parsed["lines"]
            ],
        )

    @staticmethod
    def _line_tuple(r) -> tuple:
        return (r["line_no"], r["product_id"], r["sku"], r["category"], r["quantity"], r["amount_minor"], r["currency"])

    @staticmethod
    def _upsert_products(conn: Connection, units: list[Unit]) -> dict[str, int]:
        """Upsert the catalogue by SKU (the batch's last mention of a SKU wins) and return ``{sku: id}``."""
        products: dict[str, dict] = {}
        for u in units:
            for ln in u.parsed["lines"]:
                price = ln["unit_price_minor"]
                if price is None:
                    # A reference price for the catalogue only; order amounts themselves are never rounded.
                    price = int((Decimal(ln["amount_minor"]) / ln["quantity"]).quantize(Decimal(1), ROUND_HALF_UP))
                products[ln["sku"]] = dict(sku=ln["sku"], name=ln["product_name"], category=ln["category"],
                                           price_minor=price, currency=u.parsed["currency"])
        p = Product.__table__
        ins = insert_for(conn, p)
        cols = ("name", "category", "price_minor", "currency")
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["sku"],
                set_={c: ins.excluded[c] for c in cols},
                # Skip the write (and its WAL/MVCC cost) when nothing changed.
                where=sa.or_(*(p.c[c] != ins.excluded[c] for c in cols)),
            ),
            sorted(products.values(), key=lambda r: r["sku"]),  # a stable lock order for concurrent imports
        )
        rows = conn.execute(sa.select(p.c.sku, p.c.id).where(p.c.sku.in_(list(products))))
        return {r.sku: r.id for r in rows}


class CouponsHandler(Handler):
    kind = "coupons"
    required = ("code", "member_id", "kind", "value", "issued_at", "expires_at")
    optional = ("currency", "min_spend", "redeemed_at", "redeemed_order_id", "campaign")
    key_column = "code"
    compared = ("member_id", "kind", "amount_minor", "percent_off", "currency", "min_spend_minor", "issued_at",
                "expires_at", "redeemed_at", "redeemed_order_id", "campaign")

    def parse(self, unit: Unit, ctx: Context) -> dict:
        vals, present = unit.rows[0].values, ctx.present
        kind = v.parse_enum(required_cell(vals, "kind"), CouponKind, field="kind")
        value = required_cell(vals, "value")
        p: dict[str, Any] = dict(
            code=v.bounded_text(vals["code"], field="code", max_length=64, required=True),
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            kind=kind,
            amount_minor=None,
            percent_off=None,
            issued_at=v.parse_datetime(required_cell(vals, "issued_at"), field="issued_at"),
            expires_at=v.parse_datetime(required_cell(vals, "expires_at"), field="expires_at"),
        )
        if kind == CouponKind.AMOUNT:
            p["amount_minor"] = v.parse_amount_minor(value, field="value")
            if p["amount_minor"] <= 0:
                raise v.ValidationError("value of an amount coupon must be above 0")
        else:
            p["percent_off"] = v.parse_int(value.removesuffix("%"), field="value", min_value=1, max_value=100)
        if "currency" in present:
            p["currency"] = (v.normalise_currency(vals["currency"]) if vals.get("currency")
                             else ctx.settings.shop_currency)
        if "min_spend" in present:
            p["min_spend_minor"] = (v.parse_amount_minor(vals["min_spend"], field="min_spend")
                                    if vals.get("min_spend") else 0)
        if "redeemed_at" in present:
            p["redeemed_at"] = (v.parse_datetime(vals["redeemed_at"], field="redeemed_at")
                                if vals.get("redeemed_at") else None)
        if "redeemed_order_id" in present:
            p["redeemed_order_ext"] = optional_cell(vals, "redeemed_order_id")
            if p["redeemed_order_ext"] and not p.get("redeemed_at"):
                raise v.ValidationError("redeemed_order_id is given but redeemed_at is empty")
        if "campaign" in present:
            p["campaign"] = v.bounded_text(vals.get("campaign", ""), field="campaign", max_length=64)
        return p

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        units = attach_members(conn, units)
        o = Order.__table__
        order_exts = sorted({u.parsed["redeemed_order_ext"] for u in units if u.parsed.get("redeemed_order_ext")})
        orders = ({r.external_id: (r.id, r.member_id)
                   for r in conn.execute(sa.select(o.c.external_id, o.c.id, o.c.member_id)
                                         .where(o.c.external_id.in_(order_exts)))}
                  if order_exts else {})
        kept = []
        for u in units:
            p = u.parsed
            try:
                for col in ("issued_at", "expires_at", "redeemed_at"):
                    if p.get(col) is not None:
                        p[col] = v.localise(p[col], p["tz"], field=col)
                if p["expires_at"] <= p["issued_at"]:
                    raise v.ValidationError("expires_at is not after issued_at")
                if p.get("redeemed_at") is not None:
                    v.not_in_future(p["redeemed_at"], field="redeemed_at", now=ctx.now)
                    if p["redeemed_at"] < p["issued_at"]:
                        raise v.ValidationError("redeemed_at is before issued_at")
                if "redeemed_order_ext" in p:
                    p["redeemed_order_id"] = None
                    if p["redeemed_order_ext"]:
                        hit = orders.get(p["redeemed_order_ext"])
                        if hit is None:
                            raise v.ValidationError(
                                f"unknown redeemed_order_id {v.quoted(p['redeemed_order_ext'])} (import orders first)")
                        if hit[1] != p["member_id"]:
                            raise v.ValidationError(
                                f"redeemed_order_id {v.quoted(p['redeemed_order_ext'])} belongs to another member")
                        p["redeemed_order_id"] = hit[0]
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            kept.append(u)
        c = Coupon.__table__
        defaults = dict(currency=ctx.settings.shop_currency, min_spend_minor=0, redeemed_at=None,
                        redeemed_order_id=None, campaign=None)
        upsert_simple(conn, c, "code", kept, self.compared, defaults, ctx)
