"""The targeted audience's lifetime value per arm (``membercare report --cltv``).

Per campaign with a holdout: the distribution of the members' discounted expected residual lifetime value
(:mod:`membercare.lifetime_value`, BG/NBD + Gamma-Gamma fitted on the shop's purchases up to the start of the
report period, so nothing the period's campaigns caused) in the treated arm and in the holdout, and the value of
the members who converted in each arm. A randomised holdout has the same distribution as the treated arm up to
chance (a check that the arms were comparable); the converters' value says whether the campaign moved valuable
members or bargain hunters. Members without a purchase before the period have no value in the model: counted
apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.errors import InputError
from membercare.lifetime_value import ValueSnapshot, distribution, value_snapshot
from membercare.reports.options import ReportOptions


@dataclass
class ArmValue:
    arm: str  # "treated" or "holdout"
    members: int
    with_history: int  # members with a purchase before the period (the others have no value in the model)
    value: dict[str, float] = field(default_factory=dict)  # mean, p25, median, p75, p90 (minor units)
    mean_p_alive: float = float("nan")
    converted: int = 0  # members with history who converted in the period
    converted_value: dict[str, float] = field(default_factory=dict)


def audience_values(conn: Connection, options: ReportOptions, per_row: Any) -> tuple[dict[str, list[ArmValue]], str]:
    """Campaign -> per-arm lifetime values, and a note (the evaluation time, or why there are none)."""
    try:
        snap = value_snapshot(conn, options.since, months=options.cltv_months,
                              annual_discount=options.cltv_discount)
    except InputError as exc:
        return {}, f"no lifetime value model: {exc}"
    q = sa.select(per_row.c.campaign, per_row.c.holdout, per_row.c.member_id,
                  sa.func.max(sa.case((per_row.c.orders > 0, 1), else_=0)).label("converted")
                  ).group_by(per_row.c.campaign, per_row.c.holdout, per_row.c.member_id)
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for r in conn.execute(q):
        groups.setdefault((r.campaign, int(r.holdout)), []).append((int(r.member_id), int(r.converted)))
    out: dict[str, list[ArmValue]] = {}
    for (campaign, holdout), members in sorted(groups.items()):
        out.setdefault(campaign, []).append(_arm("holdout" if holdout else "treated", members, snap))
    note = (f"evaluated at {snap.as_of:%Y-%m-%d %H:%M} UTC over {snap.months} months, "
            f"{snap.annual_discount:.0%} annual discount")
    return out, note


def _arm(name: str, members: list[tuple[int, int]], snap: ValueSnapshot) -> ArmValue:
    ids = np.array([m for m, _ in members], dtype=np.int64)
    conv = np.array([c for _, c in members], dtype=bool)
    value, alive, known = snap.lookup(ids)
    return ArmValue(name, len(members), int(known.sum()), distribution(value[known]),
                    float(np.mean(alive[known])) if known.any() else float("nan"), int((known & conv).sum()),
                    distribution(value[known & conv]))


__all__ = ["ArmValue", "audience_values"]
