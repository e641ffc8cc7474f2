"""The member kinds: members, their push devices and their consent statements."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare import validation as v
from membercare.consent import ConsentStatement, record_consents
from membercare.data.importer.handler import (
    INSERTED,
    MAX_INT32,
    UNCHANGED,
    Context,
    Handler,
    Unit,
    attach_members,
    classify,
    required_cell,
    upsert_simple,
)
from membercare.data.importer.reading import Row
from membercare.db import insert_for
from membercare.models import Channel, ConsentEvent, ConsentSource, Device, Member, Platform, Purpose


class MembersHandler(Handler):
    kind = "members"
    required = ("member_id", "name", "joined_at")
    optional = ("email", "phone", "country", "locale", "timezone", "birthday", "tier", "points_balance",
                "region", "city", "age_group", "preferred_channels")
    key_column = "member_id"
    free_text = ("name",)
    compared = ("name", "email", "phone", "country", "locale", "timezone", "birthday", "joined_at", "tier",
                "points_balance", "region", "city", "age_group", "preferred_channels")

    def parse(self, unit: Unit, ctx: Context) -> dict:
        vals, present, s = unit.rows[0].values, ctx.present, ctx.settings
        rec: dict[str, Any] = {
            "external_id": v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            "name": v.bounded_text(vals["name"], field="name", max_length=200, required=True),
        }
        if "email" in present:
            rec["email"] = v.normalise_email(vals["email"]) if vals.get("email") else None
        country = v.normalise_country(vals["country"]) if vals.get("country") else s.shop_country
        if "country" in present:
            rec["country"] = country
        if "phone" in present:
            rec["phone"] = v.normalise_phone(vals["phone"], country) if vals.get("phone") else None
        if "locale" in present:
            rec["locale"] = v.normalise_locale(vals["locale"]) if vals.get("locale") else s.shop_locale
        tz = v.normalise_timezone(vals["timezone"]) if vals.get("timezone") else s.shop_timezone
        if "timezone" in present:
            rec["timezone"] = tz
        if "birthday" in present:
            rec["birthday"] = v.parse_birthday(vals["birthday"], today=ctx.now.date()) if vals.get("birthday") else None
        if not vals["joined_at"]:
            raise v.ValidationError("joined_at is required")
        rec["joined_at"] = v.not_in_future(v.parse_datetime_utc(vals["joined_at"], tz, field="joined_at"),
                                           field="joined_at", now=ctx.now)
        if "tier" in present:
            tier = vals.get("tier", "").lower() or ctx.entry_tier
            if tier not in ctx.tiers:
                raise v.ValidationError(f"unknown tier {v.quoted(vals['tier'])} (tiers: {', '.join(ctx.tiers)})")
            rec["tier"] = tier
        if "points_balance" in present:
            rec["points_balance"] = (v.parse_int(vals["points_balance"], field="points_balance", min_value=0,
                                                 max_value=MAX_INT32) if vals.get("points_balance") else 0)
        for col, max_length in (("region", 64), ("city", 64), ("age_group", 16)):
            if col in present:
                rec[col] = v.bounded_text(vals.get(col, ""), field=col, max_length=max_length)
        if "preferred_channels" in present:
            rec["preferred_channels"] = (v.parse_channel_order(vals["preferred_channels"])
                                         if vals.get("preferred_channels") else _DEFAULT_CHANNELS)
        return rec

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        m = Member.__table__
        keys = [u.parsed["external_id"] for u in units]
        existing = {
            r["external_id"]: r
            for r in conn.execute(sa.select(m).where(m.c.external_id.in_(keys))).mappings()
        }
        s = ctx.settings
        defaults = dict(email=None, phone=None, country=s.shop_country, locale=s.shop_locale, timezone=s.shop_timezone,
                        birthday=None, tier=ctx.entry_tier, points_balance=0, region=None, city=None, age_group=None,
                        preferred_channels=_DEFAULT_CHANNELS)
        writes = []
        for u in units:
            u.outcome, row = classify(u.parsed, existing.get(u.parsed["external_id"]), self.compared, defaults)
            if u.outcome != UNCHANGED:
                writes.append({**row, "created_at": ctx.now, "updated_at": ctx.now})
        if writes:
            ins = insert_for(conn, m)
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=["external_id"],
                    set_={c: ins.excluded[c] for c in (*self.compared, "updated_at")},
                ),
                writes,
            )


_DEFAULT_CHANNELS = str(Member.model_fields["preferred_channels"].default)


class DevicesHandler(Handler):
    kind = "devices"
    required = ("member_id", "token", "platform", "app_id", "last_seen_at")
    optional = ("invalidated_at", "invalid_reason")
    key_column = "token"
    compared = ("member_id", "platform", "app_id", "last_seen_at", "invalidated_at", "invalid_reason")

    def describe_duplicate(self, key: Hashable, first_line: int) -> str:
        return f"duplicate token in this file (first on line {first_line}, which is kept)"  # tokens are secrets

    def parse(self, unit: Unit, ctx: Context) -> dict:
        vals, present = unit.rows[0].values, ctx.present
        p: dict[str, Any] = dict(
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            token=v.bounded_text(vals["token"], field="token", max_length=512, required=True),
            platform=v.parse_enum(required_cell(vals, "platform"), Platform, field="platform"),
            app_id=v.bounded_text(vals["app_id"], field="app_id", max_length=128, required=True),
            last_seen_at=v.parse_datetime(required_cell(vals, "last_seen_at"), field="last_seen_at"),
        )
        if any(ch.isspace() for ch in p["token"]):
            raise v.ValidationError("token contains whitespace")
        if "invalidated_at" in present:
            p["invalidated_at"] = (v.parse_datetime(vals["invalidated_at"], field="invalidated_at")
                                   if vals.get("invalidated_at") else None)
        if "invalid_reason" in present:
            p["invalid_reason"] = v.bounded_text(vals.get("invalid_reason", ""), field="invalid_reason", max_length=64)
        return p

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        kept = []
        for u in attach_members(conn, units):
            p = u.parsed
            try:
                for col in ("last_seen_at", "invalidated_at"):
                    if p.get(col) is not None:
                        p[col] = v.not_in_future(v.localise(p[col], p["tz"], field=col), field=col, now=ctx.now)
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            kept.append(u)
        upsert_simple(conn, Device.__table__, "token", kept, self.compared,
                       dict(invalidated_at=None, invalid_reason=None), ctx, stamp={"created_at": ctx.now})


class ConsentsHandler(Handler):
    """Consent statements, appended to the history through :func:`membercare.consent.record_consents`."""

    kind = "consents"
    required = ("member_id", "channel", "purpose", "granted", "occurred_at")
    optional = ("source", "detail")
    free_text = ("detail",)

    def file_key(self, row: Row) -> Hashable | None:
        vals = row.values
        if not vals.get("member_id"):
            return None
        try:
            when: Any = v.parse_datetime(vals.get("occurred_at", ""))
        except v.ValidationError:
            when = vals.get("occurred_at", "")
        return (vals["member_id"], vals.get("channel", "").lower(), vals.get("purpose", "").lower(), when)

    def describe_duplicate(self, key: Hashable, first_line: int) -> str:
        member, channel, purpose = key[0], key[1], key[2]  # type: ignore[index]
        return (f"duplicate statement for member_id {v.quoted(member)}, {v.quoted(channel)}/{v.quoted(purpose)} "
                f"at the same time (first on line {first_line}, which is kept)")

    def parse(self, unit: Unit, ctx: Context) -> dict:
        vals = unit.rows[0].values
        return dict(
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            channel=v.parse_enum(required_cell(vals, "channel"), Channel, field="channel"),
            purpose=v.parse_enum(required_cell(vals, "purpose"), Purpose, field="purpose"),
            granted=v.parse_bool(required_cell(vals, "granted"), field="granted"),
            occurred_at=v.parse_datetime(required_cell(vals, "occurred_at"), field="occurred_at"),
            source=(v.parse_enum(vals["source"], ConsentSource, field="source") if vals.get("source")
                    else ConsentSource.IMPORT.value),
            detail=v.bounded_text(vals.get("detail", ""), field="detail", max_length=500),
        )

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        kept = []
        for u in attach_members(conn, units):
            p = u.parsed
            try:
                p["occurred_at"] = v.not_in_future(v.localise(p["occurred_at"], p["tz"], field="occurred_at"),
                                                   field="occurred_at", now=ctx.now)
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            kept.append(u)
        if not kept:
            return
        ev = ConsentEvent.__table__
        key_cols = (ev.c.member_id, ev.c.channel, ev.c.purpose, ev.c.occurred_at)
        keys = [(u.parsed["member_id"], u.parsed["channel"], u.parsed["purpose"], u.parsed["occurred_at"])
                for u in kept]
        recorded: dict[tuple, set[bool]] = {}
        for r in conn.execute(sa.select(*key_cols, ev.c.granted).where(sa.tuple_(*key_cols).in_(keys))):
            recorded.setdefault((r.member_id, r.channel, r.purpose, r.occurred_at), set()).add(bool(r.granted))
        new = []
        in_batch: dict[tuple, int] = {}
        for u, key in zip(kept, keys, strict=True):
            stored = recorded.get(key)
            if key in in_batch:
                # The same instant written differently (naive local time vs. UTC offset) escapes the raw file key.
                p = u.parsed
                u.reject_all(f"duplicate statement for member_id {v.quoted(p['member_ext'])}, "
                             f"{p['channel']}/{p['purpose']} "
                             f"at the same instant (first on line {in_batch[key]}, which is kept)")
                continue
            in_batch[key] = u.first_line
            if not stored:
                u.outcome = INSERTED
                p = u.parsed
                new.append(ConsentStatement(member_id=p["member_id"], channel=p["channel"], purpose=p["purpose"],
                                            granted=p["granted"], source=p["source"], occurred_at=p["occurred_at"],
                                            detail=p["detail"]))
            elif stored == {u.parsed["granted"]}:
                u.outcome = UNCHANGED
            else:
                u.reject_all("contradicts the statement already recorded for this member, channel, purpose and time")
        record_consents(conn, new)
