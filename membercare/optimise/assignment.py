"""Deterministic random assignment: campaign holdouts, the global control group and template variants.

Every assignment is a pure function of stable identifiers, so that re-planning a run, planning it in
another process or on another machine, or recomputing a report months later gives the same groups
without storing a random seed anywhere.

The primitive is :func:`bucket`: the first 52 bits of SHA-256 over a domain-separated key
(``"<domain>\\x1f<part>\\x1f...\\x1f<member id>"``), an integer uniform on ``[0, 2**52)``.
:func:`unit` divides it by ``2**52`` (exactly representable in a float64, so ``unit`` is uniform on
``[0, 1)``). A member is in a group of rate ``r`` when ``bucket < threshold(r)`` with
``threshold(r) = round(r * 2**52)``. Consequences worth knowing:

* **Independence between uses.** The domain (``holdout``, ``control``, ``variant``) and the campaign
  are part of the key, so a member's holdout status in one campaign says nothing about another campaign,
  about the global control group or about their variant.
* **Monotone in the rate.** Raising a campaign's holdout from 10 % to 15 % keeps every member who was
  already held out (the threshold only grows), so changing the rate never swaps people between arms.
* **Stable across occurrences.** The holdout key has no occurrence: a recurring campaign holds out the
  same members every run, which is what measuring the cumulative effect of the campaign needs. Variant
  keys include the occurrence, so variant arms are re-drawn each run with the bandit's new shares.
* **SQL agrees with Python.** :func:`holdout_clause` / :func:`bucket_sql` build the same integer in SQL
  (PostgreSQL's built-in ``sha256``; on SQLite a deterministic function registered by
  :func:`install_sql_functions`), so set-based planning and per-member code make the same decisions.

Member ids are the database ids (``members.id``); any stable identifier works as long as the same one
is used everywhere (``str(member_id)`` is hashed).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

BITS = 52
SCALE = 1 << BITS  # 2**52: every bucket / SCALE is an exact float64 in [0, 1)
SEP = "\x1f"  # ASCII unit separator: cannot occur in campaign names or decimal ids, so keys never collide

HOLDOUT = "holdout"
CONTROL = "control"
VARIANT = "variant"

DEFAULT_HOLDOUT_RATE = 0.10
DEFAULT_CONTROL_RATE = 0.05

SQLITE_FUNCTION = "membercare_bucket52"


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not (0.0 <= rate <= 1.0) or math.isnan(rate):
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    return rate


def _check_part(part: str) -> str:
    if SEP in part:
        raise ValueError("assignment keys must not contain the unit separator \\x1f")
    return part


def key_prefix(domain: str, *parts: str) -> str:
    """The hashed text up to (and including the separator before) the member id."""
    return SEP.join([_check_part(domain), *(_check_part(str(p)) for p in parts)]) + SEP


def bucket_of_text(text: str) -> int:
    """The first 52 bits of SHA-256(UTF-8 text) as an integer in ``[0, 2**52)``."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> (64 - BITS)


def bucket(domain: str, *parts: str, member_id: int | str) -> int:
    return bucket_of_text(key_prefix(domain, *parts) + str(member_id))


def unit(domain: str, *parts: str, member_id: int | str) -> float:
    """A uniform number in ``[0, 1)`` determined by the key (see the module docstring)."""
    return bucket(domain, *parts, member_id=member_id) / SCALE


def threshold(rate: float) -> int:
    """Buckets below this integer are "in" a group of the given rate."""
    return round(_check_rate(rate) * SCALE)


def buckets(domain: str, *parts: str, member_ids: Iterable[int | str]) -> np.ndarray:
    """:func:`bucket` for many members (int64 array). About 1 µs per member."""
    prefix = key_prefix(domain, *parts)
    sha = hashlib.sha256
    ids = list(member_ids)
    out = np.empty(len(ids), dtype=np.int64)
    for i, m in enumerate(ids):
        out[i] = int.from_bytes(sha((prefix + str(m)).encode("utf-8")).digest()[:8], "big") >> (64 - BITS)
    return out


# --- holdouts and the global control group ---------------------------------------------------------


def in_holdout(member_id: int | str, campaign: str, rate: float = DEFAULT_HOLDOUT_RATE) -> bool:
    """Whether the member is in ``campaign``'s holdout: planned, recorded with reason ``holdout``, never sent."""
    return bucket(HOLDOUT, campaign, member_id=member_id) < threshold(rate)


def holdout_mask(member_ids: Iterable[int | str], campaign: str, rate: float = DEFAULT_HOLDOUT_RATE) -> np.ndarray:
    """Vectorised :func:`in_holdout`: a boolean array aligned with ``member_ids``."""
    return buckets(HOLDOUT, campaign, member_ids=member_ids) < threshold(rate)


def in_global_control(member_id: int | str, programme_salt: str, rate: float = DEFAULT_CONTROL_RATE) -> bool:
    """Whether the member is in the programme-wide control group (receives no marketing at all).

    ``programme_salt`` names one measurement period of the programme (e.g. ``"2026"``): changing it
    draws a fresh control group, which is how a shop rotates members out of the control group so that
    nobody is excluded from marketing forever. Keep it constant within a measurement period.
    """
    return bucket(CONTROL, programme_salt, member_id=member_id) < threshold(rate)


def global_control_mask(
    member_ids: Iterable[int | str], programme_salt: str, rate: float = DEFAULT_CONTROL_RATE
) -> np.ndarray:
    return buckets(CONTROL, programme_salt, member_ids=member_ids) < threshold(rate)


# --- variants ---------------------------------------------------------------------------------------


def _cumulative(shares: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """Variant names in sorted order (so the dict's insertion order never matters) and integer cut points."""
    if not shares:
        raise ValueError("at least one variant is required")
    names = sorted(shares)
    w = np.array([float(shares[n]) for n in names])
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"variant shares must be non-negative and not all zero, got {dict(shares)!r}")
    cum = np.cumsum(w / w.sum())
    cuts = np.round(cum * SCALE).astype(np.int64)
    cuts[-1] = SCALE  # rounding must never leave the top bucket unassigned
    return names, cuts


def assign_variant(member_id: int | str, campaign: str, occurrence: str, shares: Mapping[str, float]) -> str:
    """The member's template variant in this run, drawn with probabilities ``shares`` (normalised).

    Variants are laid out on ``[0, 1)`` in name order; a variant with share 0 is never chosen.
    """
    names, cuts = _cumulative(shares)
    b = bucket(VARIANT, campaign, occurrence, member_id=member_id)
    return names[int(np.searchsorted(cuts, b, side="right"))]


def assign_variants(
    member_ids: Sequence[int | str], campaign: str, occurrence: str, shares: Mapping[str, float]
) -> np.ndarray:
    """Vectorised :func:`assign_variant`: an object array of variant names aligned with ``member_ids``."""
    names, cuts = _cumulative(shares)
    idx = np.searchsorted(cuts, buckets(VARIANT, campaign, occurrence, member_ids=member_ids), side="right")
    return np.asarray(names, dtype=object)[idx]


def variant_picker(campaign: str, occurrence: str, shares: Mapping[str, float]) -> Callable[[int | str], str]:
    """:func:`assign_variant` for one run as a fast per-member function (cut points computed once).

    ``picker(member_id)`` gives exactly ``assign_variant(member_id, campaign, occurrence, shares)``;
    the planner calls it once per member.
    """
    import bisect

    names, cuts = _cumulative(shares)
    cut_list = [int(c) for c in cuts]
    prefix = key_prefix(VARIANT, campaign, occurrence)

    def pick(member_id: int | str) -> str:
        return names[bisect.bisect_right(cut_list, bucket_of_text(prefix + str(member_id)))]

    return pick


# --- SQL -------------------------------------------------------------------------------------------


class bucket_sql(FunctionElement):
    """SQL expression for :func:`bucket_of_text` of a text expression (BIGINT in ``[0, 2**52)``).

    PostgreSQL computes it with the built-in ``sha256`` (PostgreSQL 11+); SQLite calls the function
    registered by :func:`install_sql_functions`.
    """

    type = sa.BigInteger()
    inherit_cache = True
    name = "membercare_bucket52"


@compiles(bucket_sql, "postgresql")
def _bucket_pg(element, compiler, **kw):
    arg = compiler.process(list(element.clauses)[0], **kw)
    # 13 hex digits = 52 bits; bit(52) -> bigint reads them as an unsigned big-endian number.
    return f"(('x' || substr(encode(sha256(convert_to({arg}, 'UTF8')), 'hex'), 1, 13))::bit(52)::bigint)"


@compiles(bucket_sql, "sqlite")
def _bucket_sqlite(element, compiler, **kw):
    return f"{SQLITE_FUNCTION}({compiler.process(list(element.clauses)[0], **kw)})"


@compiles(bucket_sql)
def _bucket_other(element, compiler, **kw):  # pragma: no cover - only the two supported backends
    raise sa.exc.CompileError(f"bucket_sql is not available on {compiler.dialect.name}")


def _sqlite_bucket(text):
    return None if text is None else bucket_of_text(str(text))


def _register(dbapi_conn, *_):
    if hasattr(dbapi_conn, "create_function"):
        dbapi_conn.create_function(SQLITE_FUNCTION, 1, _sqlite_bucket, deterministic=True)


def install_sql_functions(engine: Engine) -> None:
    """Make :func:`bucket_sql` work on a SQLite engine (no-op elsewhere). Idempotent.

    Registers the function on every connection as it is checked out of the pool, so connections opened
    before this call are covered too.
    """
    if engine.dialect.name != "sqlite":
        return
    if not event.contains(engine, "checkout", _register):
        event.listen(engine, "checkout", _register)
        event.listen(engine, "connect", _register)


def _member_bucket_sql(member_id_col: sa.ColumnElement[int], domain: str, *parts: str) -> bucket_sql:
    return bucket_sql(sa.literal(key_prefix(domain, *parts), sa.Text) + sa.cast(member_id_col, sa.Text))


def holdout_clause(member_id_col: sa.ColumnElement[int], campaign: str,
                   rate: float = DEFAULT_HOLDOUT_RATE) -> sa.ColumnElement[bool]:
    """A SQL boolean, true for members in ``campaign``'s holdout; agrees exactly with :func:`in_holdout`.

    ``member_id_col`` is an integer column (e.g. ``Member.id``): it is cast to text as ``str(int)``
    would format it. On SQLite call :func:`install_sql_functions` on the engine first.
    """
    return _member_bucket_sql(member_id_col, HOLDOUT, campaign) < threshold(rate)


def global_control_clause(member_id_col: sa.ColumnElement[int], programme_salt: str,
                          rate: float = DEFAULT_CONTROL_RATE) -> sa.ColumnElement[bool]:
    """A SQL boolean, true for members in the global control group; agrees with :func:`in_global_control`."""
    return _member_bucket_sql(member_id_col, CONTROL, programme_salt) < threshold(rate)
