"""Segments: named, documented, parameterised member selections evaluated as SQL inside the database.

Public API (see :mod:`segments.base` for the model and docs/segments.md for the definitions)::

    from segments import ref, parse, SegmentContext, count, rows, member_id_batches
    ctx = SegmentContext(conn, as_of)
    count(ctx, ref("vip") - ref("churn_risk"))
    rows(ctx, parse("birthday_today or coupon_expiring"), limit=20)

Prefect-free: flows import this package, never the other way round.
"""

from segments.base import (
    Param,
    Segment,
    SegmentContext,
    SegmentDefinition,
    compiled_sql,
    count,
    definitions,
    get,
    member_id_batches,
    parse,
    parse_param_options,
    ref,
    rows,
    segment,
)

__all__ = [
    "Param", "Segment", "SegmentContext", "SegmentDefinition", "compiled_sql", "count", "definitions", "get",
    "member_id_batches", "parse", "parse_param_options", "ref", "rows", "segment",
]
