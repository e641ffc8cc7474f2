"""The base of an import kind (:class:`Handler`) and the helpers the kinds share.

A kind parses each :class:`Unit` without the database (:meth:`Handler.parse`), then writes a batch of
valid units in the caller's transaction (:meth:`Handler.write`), classifying each as inserted, updated
or unchanged, or rejecting it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare import validation as v
from membercare.config import Settings
from membercare.data.importer.reading import Row
from membercare.db import insert_for
from membercare.models import Member

INSERTED, UPDATED, UNCHANGED = "inserted", "updated", "unchanged"
MAX_INT32 = 2**31 - 1


@dataclass
class Unit:
    """What is accepted or rejected as a whole: one row, or all lines of one order."""

    rows: list[Row]
    parsed: Any = None
    outcome: str | None = None
    rejects: dict[int, str] = field(default_factory=dict)

    @property
    def first_line(self) -> int:
        return self.rows[0].line

    def reject_all(self, reason: str) -> None:
        for row in self.rows:
            self.rejects.setdefault(row.line, reason)


@dataclass
class Context:
    settings: Settings
    present: frozenset[str]
    tiers: dict[str, int]
    entry_tier: str
    now: datetime


class Handler:
    """One import kind. Subclasses declare their columns and implement ``parse`` and ``write``."""

    kind: str = ""
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    key_column: str = ""
    groups_lines = False
    # Columns of free text that may hold tabs and line breaks (as a spreadsheet cell can); in every other
    # column a tab, a line break or any other control character rejects the row.
    free_text: tuple[str, ...] = ()

    @property
    def all_columns(self) -> tuple[str, ...]:
        return self.required + self.optional

    def file_key(self, row: Row) -> Hashable | None:
        """The key that must be unique within the file, from the raw row (``None`` when missing)."""
        return row.values.get(self.key_column) or None

    def describe_duplicate(self, key: Hashable, first_line: int) -> str:
        return (f"duplicate {self.key_column} {v.quoted(str(key))} in this file "
                f"(first on line {first_line}, which is kept)")

    def parse(self, unit: Unit, ctx: Context) -> Any:
        """Database-free validation. Return the parsed unit or raise :class:`~membercare.validation.ValidationError`."""
        raise NotImplementedError

    def write(self, conn: Connection, units: list[Unit], ctx: Context) -> None:
        """Apply valid units in the caller's transaction; set ``unit.outcome`` or reject the unit."""
        raise NotImplementedError


def _members_by_external_id(conn: Connection, external_ids: Iterable[str]) -> dict[str, tuple[int, str]]:
    m = Member.__table__
    keys = sorted(set(external_ids))
    if not keys:
        return {}
    rows = conn.execute(sa.select(m.c.external_id, m.c.id, m.c.timezone).where(m.c.external_id.in_(keys)))
    return {r.external_id: (r.id, r.timezone) for r in rows}


def attach_members(conn: Connection, units: list[Unit]) -> list[Unit]:
    """Resolve ``parsed["member_ext"]`` to ``member_id`` and ``tz``; reject units of unknown members."""
    found = _members_by_external_id(conn, (u.parsed["member_ext"] for u in units))
    kept = []
    for u in units:
        hit = found.get(u.parsed["member_ext"])
        if hit is None:
            u.reject_all(f"unknown member_id {v.quoted(u.parsed['member_ext'])} (import members first)")
            continue
        u.parsed["member_id"], u.parsed["tz"] = hit
        kept.append(u)
    return kept


def classify(record: dict, existing: Mapping[Any, Any] | None, compared: Sequence[str],
             defaults: dict) -> tuple[str, dict]:
    """Merge a parsed record (only the columns the file has) with the stored row or the defaults.

    A column the file does not have keeps its stored value on update; an empty cell in a column the file
    has means "no value" (NULL, or the column's default).
    """
    if existing is None:
        return INSERTED, {**defaults, **record}
    merged = {c: existing[c] for c in compared} | record
    same = all(merged[c] == existing[c] for c in compared)
    return (UNCHANGED if same else UPDATED), merged


def optional_cell(values: dict[str, str], column: str) -> str | None:
    text = values.get(column, "")
    return text or None


def required_cell(vals: dict[str, str], column: str) -> str:
    text = vals.get(column, "")
    if not text:
        raise v.ValidationError(f"{column} is required")
    return text


def upsert_simple(conn: Connection, table: sa.Table, key: str, units: list[Unit], compared: Sequence[str],
                   defaults: dict, ctx: Context, *, stamp: dict | None = None) -> None:
    """The common path: fetch existing rows by key, classify, upsert the changed ones in one statement."""
    if not units:
        return
    keys = [u.parsed[key] for u in units]
    existing = {r[key]: r for r in conn.execute(sa.select(table).where(table.c[key].in_(keys))).mappings()}
    writes = []
    for u in units:
        record = {c: u.parsed[c] for c in compared if c in u.parsed}
        u.outcome, row = classify(record, existing.get(u.parsed[key]), compared, defaults)
        if u.outcome != UNCHANGED:
            writes.append({key: u.parsed[key], **row, **(stamp or {})})
    if writes:
        ins = insert_for(conn, table)
        conn.execute(
            ins.on_conflict_do_update(index_elements=[key], set_={c: ins.excluded[c] for c in compared}), writes
        )
