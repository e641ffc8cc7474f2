"""Segment definitions, their registry, composition, and evaluation inside the database.

A *segment definition* is a name, a description, typed parameters with defaults and validation, and
a *builder*: ``build(ctx, params) -> Select``. The select returns one row per member, with a
``member_id`` column first and then the "why" columns that explain membership (the coupon codes
that expire, the P(alive) that fell, the birthday being celebrated). Builders never touch member
rows in Python: they return SQL, which :func:`count`, :func:`rows` and :func:`member_id_batches`
run inside the database.

Everything is evaluated for an explicit ``as_of`` (aware UTC). Orders, coupons and members that only
appear after ``as_of`` are invisible, so evaluating a past date reproduces what the segment was then
(as far as the data allows: a refund recorded later is already visible).

Member-local calendar logic (birthdays, "day k of membership") needs each member's IANA zone. SQLite
has no time-zone database, so :class:`SegmentContext` reads ``SELECT DISTINCT timezone FROM members``
(a handful of zones), computes the member-local date and day boundaries at ``as_of`` in Python with
:mod:`zoneinfo`, and builders pass them into the SQL as a small constant table or CASE mapping. The
SQL then only compares stored UTC values with UTC bounds, which is also index-friendly.

Composition: ``a & b`` (both), ``a | b`` (either), ``~a`` (members not in ``a``), ``a - b``
(``a`` excluding members of ``b``); or the text form parsed by :func:`parse`:
``"vip and not churn_risk"``, ``"new_members or birthday_today except region"``.

Extension point: register a new segment with :func:`segment` (see :mod:`segments.standard`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.errors import InputError, UnknownNameError
from membercare.models import Member, Tier
from membercare.timeutil import UTC, UTCDateTime, ensure_utc
from segments import sqlfn

_REQUIRED = object()


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class Param:
    """A typed segment parameter. ``type`` is int, float, str or bool; ``default`` omitted = required."""

    name: str
    type: type
    default: Any = _REQUIRED
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def describe(self) -> str:
        bits = [self.type.__name__]
        if self.choices:
            bits = ["|".join(self.choices)]
        if self.min is not None or self.max is not None:
            low = _fmt(self.min) if self.min is not None else ""
            high = _fmt(self.max) if self.max is not None else ""
            bits.append(f"{low}..{high}")
        bits.append("required" if self.required else f"default {self.default!r}")
        return f"{self.name} ({', '.join(bits)}): {self.help}"

    def coerce(self, segment: str, value: Any) -> Any:
        """Validate (and, for CLI strings, convert) ``value``; raise :class:`InputError` naming the rule."""
        where = f"segment {segment!r} parameter {self.name!r}"
        if value is None:
            if self.default is None:
                return None
            raise InputError(f"{where} is required: {self.help}")
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = low in ("true", "1", "yes")
                value = bool(value)
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value.strip()) if isinstance(value, str) else int(value)
            elif self.type is float:
                value = float(value)
                if value != value:
                    raise ValueError
            else:
                value = str(value).strip()
                if not value:
                    raise ValueError
        except (TypeError, ValueError):
            expected = "a non-empty string" if self.type is str else "a " + self.type.__name__
            raise InputError(f"{where} must be {expected}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise InputError(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise InputError(f"{where} must be between {_fmt(self.min)} and {_fmt(self.max)}; got {value!r}")
        return value


def _fmt(v) -> str:
    return "-inf" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


# --------------------------------------------------------------------------------------------
# Evaluation context


@dataclass
class SegmentContext:
    """What a builder may use: the connection, ``as_of`` and the facts derived from it.

    ``shop_timezone`` only decides which stored score snapshot is "the latest on or before as_of"
    (snapshots are labelled with the shop-local date they were computed for).
    """

    conn: Connection
    as_of: datetime
    shop_timezone: str = "UTC"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.as_of = ensure_utc(self.as_of)

    @property
    def dialect(self) -> str:
        return self.conn.dialect.name

    @cached_property
    def as_of_date(self) -> date:
        """The shop-local calendar date of ``as_of`` (labels score snapshots)."""
        return self.as_of.astimezone(ZoneInfo(self.shop_timezone)).date()

    def at(self, value: datetime) -> sa.ColumnElement:
        """A timestamp bind comparable with stored UTC columns on both backends."""
        return sa.literal(ensure_utc(value), UTCDateTime)

    @property
    def as_of_lit(self) -> sa.ColumnElement:
        return self.at(self.as_of)

    def days_ago(self, days: float) -> sa.ColumnElement:
        return self.at(self.as_of - timedelta(days=days))

    @property
    def as_of_epoch_days(self) -> float:
        return sqlfn.py_epoch_days(self.as_of)

    def epoch_days(self, expr: sqlfn.Sql) -> sa.ColumnElement:
        return sqlfn.epoch_days(self.dialect, expr)

    def days_since(self, expr: sqlfn.Sql) -> sa.ColumnElement:
        """Whole days between ``expr`` (a stored timestamp) and ``as_of``."""
        return sqlfn.floor_int(self.dialect, sa.literal(self.as_of_epoch_days, sa.Float) - self.epoch_days(expr))

    @cached_property
    def timezones(self) -> list[str]:
        """Distinct member time zones (a handful; unknown zone names are reported in ``notes`` and skipped)."""
        m = Member.__table__
        zones = []
        for (name,) in self.conn.execute(sa.select(m.c.timezone).distinct()):
            try:
                ZoneInfo(name)
            except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError for malformed keys
                self.notes.append(f"members with unknown time zone {name!r} are skipped by time-zone based segments")
                continue
            zones.append(name)
        return sorted(zones)

    def local_date(self, tz: str) -> date:
        return self.as_of.astimezone(ZoneInfo(tz)).date()

    def local_day_bounds(self, tz: str, day: date) -> tuple[datetime, datetime]:
        """UTC instants at which ``day`` starts and the next day starts in ``tz`` (DST-correct)."""
        zone = ZoneInfo(tz)
        start = datetime.combine(day, time(0), zone).astimezone(UTC)
        end = datetime.combine(day + timedelta(days=1), time(0), zone).astimezone(UTC)
        return start, end

    @cached_property
    def tiers(self) -> list[dict]:
        t = Tier.__table__
        return [dict(r) for r in self.conn.execute(sa.select(t).order_by(t.c.rank)).mappings()]

    def latest_snapshot(self, table: sa.Table, what: str, command: str) -> date | None:
        """The newest ``as_of_date`` of a score table on or before this context's date (None + a note if none)."""
        d = self.conn.execute(
            sa.select(sa.func.max(table.c.as_of_date)).where(table.c.as_of_date <= self.as_of_date)
        ).scalar()
        if d is None:
            self.notes.append(f"no {what} on or before {self.as_of_date.isoformat()}: run `{command}` first")
        elif (self.as_of_date - d).days > 31:
            self.notes.append(f"{what} are from {d.isoformat()}, "
                              f"more than a month before {self.as_of_date.isoformat()}")
        return d

    def empty(self, *cols: sa.ColumnElement) -> sa.Select:
        """A select with the right columns and no rows (e.g. nothing scored yet)."""
        nulls = [sa.cast(sa.null(), c.type).label(c.name) for c in cols]
        return sa.select(sa.cast(sa.null(), sa.BigInteger).label("member_id"), *nulls).where(sa.false())


Builder = Callable[[SegmentContext, dict], sa.Select]


@dataclass(frozen=True)
class SegmentDefinition:
    """A registered segment. ``build`` returns a select whose first column is ``member_id``."""

    name: str
    description: str
    params: tuple[Param, ...]
    build: Builder

    def param(self, key: str) -> Param:
        for p in self.params:
            if p.name == key:
                return p
        raise UnknownNameError(f"parameter of segment {self.name!r}", key, [p.name for p in self.params])

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict:
        """Defaults plus validated ``overrides``; unknown keys and invalid values raise :class:`InputError`."""
        overrides = dict(overrides or {})
        for key in overrides:
            self.param(key)
        out = {}
        for p in self.params:
            value = overrides.get(p.name, None if p.required else p.default)
            out[p.name] = p.coerce(self.name, value) if (value is not None or p.required) else None
        return out


_REGISTRY: dict[str, SegmentDefinition] = {}


def segment(name: str, description: str, *params: Param) -> Callable[[Builder], Builder]:
    """Decorator registering a builder as a named segment."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"segment names are lower_snake_case: {name!r}")

    def register(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"segment {name!r} is already registered")
        _REGISTRY[name] = SegmentDefinition(name, description.strip(), tuple(params), fn)
        return fn

    return register


def definitions() -> list[SegmentDefinition]:
    _load_standard()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get(name: str) -> SegmentDefinition:
    _load_standard()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("segment", name, _REGISTRY) from None


def _load_standard() -> None:
    import segments.catalogue  # (registers new_arrivals and back_in_stock)
    import segments.standard  # noqa: F401  (registers the standard set)


# --------------------------------------------------------------------------------------------
# Segment expressions and composition


class Segment:
    """A segment expression: a reference to a definition with parameters, or a combination."""

    @property
    def label(self) -> str:
        raise NotImplementedError

    def select(self, ctx: SegmentContext) -> sa.Select:
        raise NotImplementedError

    def __and__(self, other: Segment) -> Segment:
        return And(self, other)

    def __or__(self, other: Segment) -> Segment:
        return Or(self, other)

    def __invert__(self) -> Segment:
        return Not(self)

    def __sub__(self, other: Segment) -> Segment:
        return Excluding(self, other)

    def refs(self) -> Iterator[Ref]:
        raise NotImplementedError


@dataclass(frozen=True)
class Ref(Segment):
    definition: SegmentDefinition
    params: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return self.definition.name

    def select(self, ctx: SegmentContext) -> sa.Select:
        return self.definition.build(ctx, dict(self.params))

    def refs(self) -> Iterator[Ref]:
        yield self


def ref(name: str, **params: Any) -> Ref:
    """``ref("coupon_expiring", days=3)``: a validated reference to a registered segment."""
    d = get(name)
    return Ref(d, tuple(sorted(d.resolve(params).items())))


def _columns(sel: sa.Subquery, prefix: str | None = None, taken: set[str] | None = None) -> list:
    out = []
    for c in sel.c:
        if c.name == "member_id":
            continue
        name = c.name
        if taken is not None:
            if name in taken and prefix:
                name = f"{prefix}.{name}"
            taken.add(name)
        out.append(c.label(name))
    return out


def _not_in(ctx: SegmentContext, id_col, sub: sa.Subquery):
    # SQLite materialises a NOT IN subquery once; PostgreSQL turns NOT EXISTS into a hash anti-join
    # (its NOT IN over a large subquery degrades to a per-row scan once it exceeds work_mem).
    if ctx.dialect == "sqlite":
        return id_col.not_in(sa.select(sub.c.member_id))
    return ~sa.exists().where(sub.c.member_id == id_col)


@dataclass(frozen=True)
class And(Segment):
    left: Segment
    right: Segment

    @property
    def label(self) -> str:
        return f"({self.left.label} and {self.right.label})"

    def select(self, ctx: SegmentContext) -> sa.Select:
        lq = self.left.select(ctx).subquery()
        rq = self.right.select(ctx).subquery()
        taken = {"member_id"}
        cols = _columns(lq, None, taken) + _columns(rq, _plain(self.right), taken)
        return sa.select(lq.c.member_id, *cols).join_from(lq, rq, lq.c.member_id == rq.c.member_id)

    def refs(self) -> Iterator[Ref]:
        yield from self.left.refs()
        yield from self.right.refs()


@dataclass(frozen=True)
class Or(Segment):
    left: Segment
    right: Segment

    @property
    def label(self) -> str:
        return f"({self.left.label} or {self.right.label})"

    def select(self, ctx: SegmentContext) -> sa.Select:
        lq = self.left.select(ctx).subquery()
        rq = self.right.select(ctx).subquery()
        ids = sa.union(sa.select(lq.c.member_id), sa.select(rq.c.member_id)).subquery()
        taken = {"member_id", "matched"}
        matched = sa.case(
            (sa.and_(lq.c.member_id.is_not(None), rq.c.member_id.is_not(None)), "both"),
            (lq.c.member_id.is_not(None), _plain(self.left)),
            else_=_plain(self.right),
        )
        cols = _columns(lq, None, taken) + _columns(rq, _plain(self.right), taken)
        return (
            sa.select(ids.c.member_id, matched.label("matched"), *cols)
            .select_from(ids)
            .outerjoin(lq, lq.c.member_id == ids.c.member_id)
            .outerjoin(rq, rq.c.member_id == ids.c.member_id)
        )

    def refs(self) -> Iterator[Ref]:
        yield from self.left.refs()
        yield from self.right.refs()


@dataclass(frozen=True)
class Not(Segment):
    inner: Segment

    @property
    def label(self) -> str:
        return f"not {self.inner.label}"

    def select(self, ctx: SegmentContext) -> sa.Select:
        m = Member.__table__
        q = self.inner.select(ctx).subquery()
        joined = sqlfn.mostly_true(ctx.dialect, m.c.joined_at <= ctx.as_of_lit)
        return sa.select(m.c.id.label("member_id")).where(joined, _not_in(ctx, m.c.id, q))

    def refs(self) -> Iterator[Ref]:
        yield from self.inner.refs()


@dataclass(frozen=True)
class Excluding(Segment):
    base: Segment
    excluded: Segment

    @property
    def label(self) -> str:
        return f"({self.base.label} except {self.excluded.label})"

    def select(self, ctx: SegmentContext) -> sa.Select:
        bq = self.base.select(ctx).subquery()
        xq = self.excluded.select(ctx).subquery()
        return sa.select(bq.c.member_id, *_columns(bq)).where(_not_in(ctx, bq.c.member_id, xq))

    def refs(self) -> Iterator[Ref]:
        yield from self.base.refs()
        yield from self.excluded.refs()


def _plain(seg: Segment) -> str:
    return seg.label.strip("()").replace(" ", "_")


# --------------------------------------------------------------------------------------------
# Text form: "vip and not churn_risk", "(new_members or birthday_today) except region"

_TOKEN = re.compile(r"\s*(?:(\()|(\))|([A-Za-z_][A-Za-z0-9_]*)|(&|\||!|-))")
_SYMBOLS = {"&": "and", "|": "or", "!": "not", "-": "except"}


def parse(text: str, params: Mapping[str, Mapping[str, Any]] | None = None) -> Segment:
    """Parse a segment expression. Precedence, loosest first: ``or``, ``except``, ``and``, ``not``.

    ``params`` maps a segment name to its parameter overrides (``{"new_members": {"days": 7}}``);
    they apply to every occurrence of that segment in the expression.
    """
    text = text.strip()
    parser = _Parser(text, _tokens(text), {k: dict(v) for k, v in (params or {}).items()})
    node = parser.p_or()
    if parser.i != len(parser.tokens):
        raise InputError(f"unexpected {parser.tokens[parser.i]!r} in segment expression {text!r}")
    for name in parser.params:
        if name not in parser.used:
            get(name)  # unknown names get the usual error naming the valid segments
            raise InputError(f"parameters given for segment {name!r}, which is not in {text!r}")
    return node


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        mt = _TOKEN.match(text, pos)
        if not mt or mt.end() == pos:
            raise InputError(f"cannot parse segment expression at {text[pos:]!r}")
        tok = next(g for g in mt.groups() if g is not None)
        tokens.append(_SYMBOLS.get(tok, tok.lower() if tok.lower() in ("and", "or", "not", "except") else tok))
        pos = mt.end()
    if not tokens:
        raise InputError("empty segment expression")
    return tokens


class _Parser:
    """Recursive descent over the tokens, one method per precedence level."""

    def __init__(self, text: str, tokens: list[str], params: dict[str, dict[str, Any]]):
        self.text, self.tokens, self.params = text, tokens, params
        self.used: set[str] = set()
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        self.i += 1
        return self.tokens[self.i - 1]

    def p_or(self) -> Segment:
        node = self.p_except()
        while self.peek() == "or":
            self.take()
            node = Or(node, self.p_except())
        return node

    def p_except(self) -> Segment:
        node = self.p_and()
        while self.peek() == "except":
            self.take()
            node = Excluding(node, self.p_and())
        return node

    def p_and(self) -> Segment:
        node = self.p_not()
        while self.peek() == "and":
            self.take()
            node = And(node, self.p_not())
        return node

    def p_not(self) -> Segment:
        if self.peek() == "not":
            self.take()
            return Not(self.p_not())
        return self.p_atom()

    def p_atom(self) -> Segment:
        tok = self.take() if self.peek() is not None else None
        if tok == "(":
            node = self.p_or()
            if self.peek() != ")":
                raise InputError(f"missing ')' in segment expression {self.text!r}")
            self.take()
            return node
        if tok is None or tok in ("and", "or", "not", "except", ")"):
            raise InputError(f"expected a segment name in {self.text!r}" + (f" before {tok!r}" if tok else ""))
        self.used.add(tok)
        return ref(tok, **self.params.get(tok, {}))


def names_in(text: str) -> set[str]:
    """Segment names mentioned in an expression (keywords excluded)."""
    return {g[2] for g in _TOKEN.findall(text) if g[2] and g[2].lower() not in ("and", "or", "not", "except")}


def parse_param_options(options: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["new_members.days=7", "region.region=North"]`` -> ``{"new_members": {"days": "7"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for opt in options:
        key, eq, value = opt.partition("=")
        seg, dot, name = key.strip().partition(".")
        if not eq or not dot or not seg or not name:
            raise InputError(f"--param must look like SEGMENT.NAME=VALUE (e.g. new_members.days=7), got {opt!r}")
        out.setdefault(seg, {})[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Running segments


def context(conn: Connection, as_of: datetime, shop_timezone: str = "UTC") -> SegmentContext:
    return SegmentContext(conn, as_of, shop_timezone)


def as_segment(seg: Segment | str) -> Segment:
    return parse(seg) if isinstance(seg, str) else seg


def count(ctx: SegmentContext, seg: Segment | str) -> int:
    q = as_segment(seg).select(ctx).subquery()
    return int(ctx.conn.execute(sa.select(sa.func.count()).select_from(q)).scalar_one())


def rows(ctx: SegmentContext, seg: Segment | str, *, limit: int | None = None) -> list[dict]:
    """Members of the segment with their identity and the "why" columns, ordered by member id.

    Contact details are returned raw; callers that display them must redact.
    """
    m = Member.__table__
    q = as_segment(seg).select(ctx).subquery()
    stmt = (
        sa.select(m.c.external_id, m.c.name, m.c.email, m.c.phone, m.c.timezone, *[c for c in q.c])
        .join_from(q, m, m.c.id == q.c.member_id)
        .order_by(q.c.member_id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [dict(r) for r in ctx.conn.execute(stmt).mappings()]


def member_id_batches(ctx: SegmentContext, seg: Segment | str, *, batch_size: int = 5000) -> Iterator[list[int]]:
    """Stream member ids in ascending batches (server-side cursor on PostgreSQL)."""
    q = as_segment(seg).select(ctx).subquery()
    result = ctx.conn.execute(sa.select(q.c.member_id).order_by(q.c.member_id),
                             execution_options={"yield_per": batch_size})
    for part in result.partitions(batch_size):
        yield [r[0] for r in part]


def compiled_sql(ctx: SegmentContext, seg: Segment | str) -> str:
    """The SQL a segment runs, with its constants inlined (for review and ``EXPLAIN``)."""
    stmt = as_segment(seg).select(ctx)
    return str(stmt.compile(dialect=ctx.conn.dialect, compile_kwargs={"literal_binds": True}))
