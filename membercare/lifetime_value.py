"""Members' expected residual lifetime value (CLTV) and P(alive) at an ``as_of``, for the member profile, the
report and offer sizing.

The models are those of :mod:`segments.value` (BG/NBD for purchases, Gamma-Gamma for spend, fitted on the whole
shop's purchases up to ``as_of``, as-of correct statuses); the value is the discounted expected residual value
over ``months`` (:func:`segments.cltv.residual_value`). Fitting is per shop, not per member, so a
:class:`ValueSnapshot` holds every buyer's figures and callers look members up in it: one fit per report, per
profile view, and per campaign run (:func:`run_snapshot` keeps the last few runs' snapshots in the process, so
the batches of one run share one fit). Members with no purchase up to ``as_of`` are not in the models: their
value is unknown (the lookups say so; offer sizing puts them in the lowest tier).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from numpy.typing import ArrayLike
from sqlalchemy.engine import Connection

from membercare.timeutil import ensure_utc
from segments import churn
from segments.base import context
from segments.value import member_values

DEFAULT_MONTHS = 12
DEFAULT_DISCOUNT = 0.10


@dataclass(frozen=True)
class ValueSnapshot:
    """Every buyer's figures at ``as_of`` (arrays sorted by ``member_id``; money in minor units)."""

    as_of: datetime
    months: int
    annual_discount: float
    member_id: np.ndarray
    value: np.ndarray  # discounted expected residual value over `months`
    p_alive: np.ndarray
    purchases: np.ndarray  # purchase days up to as_of (x + 1)

    def lookup(self, member_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(value, p_alive, known)`` of each member; ``known`` is False (value 0, P(alive) nan) for members
        without a purchase up to ``as_of``."""
        ids = np.asarray(member_ids, dtype=np.int64).reshape(-1)
        pos = np.clip(np.searchsorted(self.member_id, ids), 0, max(len(self.member_id) - 1, 0))
        known = (self.member_id[pos] == ids) if len(self.member_id) else np.zeros(ids.shape, dtype=bool)
        value = np.where(known, self.value[pos] if len(self.value) else 0.0, 0.0)
        alive = np.where(known, self.p_alive[pos] if len(self.p_alive) else np.nan, np.nan)
        return value, alive, known


def value_snapshot(conn: Connection, as_of: datetime, *, months: int = DEFAULT_MONTHS,
                   annual_discount: float = DEFAULT_DISCOUNT) -> ValueSnapshot:
    """Fit BG/NBD and Gamma-Gamma on the shop's purchases up to ``as_of`` and evaluate every buyer there.
    Raises :class:`membercare.errors.InputError` when the shop has too few (repeat) buyers to fit."""
    as_of = ensure_utc(as_of)
    mv = member_values(context(conn, as_of), months=months, annual_discount=annual_discount)
    alive = churn.p_alive(mv.bgnbd, mv.x, mv.t_x, mv.T)
    order = np.argsort(mv.member_id, kind="stable")
    return ValueSnapshot(as_of, months, annual_discount, mv.member_id[order], mv.value[order],
                         np.clip(np.asarray(alive, dtype=float)[order], 0.0, 1.0), (mv.x + 1)[order])


_RUNS: OrderedDict[tuple, ValueSnapshot] = OrderedDict()
_LOCK = threading.Lock()
_KEEP = 4


def run_snapshot(conn: Connection, run_key: str, as_of: datetime, *, months: int = DEFAULT_MONTHS,
                 annual_discount: float = DEFAULT_DISCOUNT) -> ValueSnapshot:
    """The snapshot of one campaign run (``run_key``: e.g. campaign|occurrence), fitted at its first use in this
    process and reused by its later batches (the last few runs are kept)."""
    key = (run_key, ensure_utc(as_of), months, annual_discount, str(conn.engine.url))
    with _LOCK:
        if key in _RUNS:
            _RUNS.move_to_end(key)
            return _RUNS[key]
    snap = value_snapshot(conn, as_of, months=months, annual_discount=annual_discount)
    with _LOCK:
        _RUNS[key] = snap
        while len(_RUNS) > _KEEP:
            _RUNS.popitem(last=False)
    return snap


def distribution(values: ArrayLike) -> dict[str, float]:
    """Mean and quantiles (25, 50, 75, 90 %) of a set of values (empty: all nan)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "p25": float("nan"), "median": float("nan"), "p75": float("nan"),
                "p90": float("nan")}
    q = np.quantile(v, [0.25, 0.5, 0.75, 0.9])
    return {"mean": float(v.mean()), "p25": float(q[0]), "median": float(q[1]), "p75": float(q[2]),
            "p90": float(q[3])}


__all__ = ["DEFAULT_DISCOUNT", "DEFAULT_MONTHS", "ValueSnapshot", "distribution", "run_snapshot",
           "value_snapshot"]
