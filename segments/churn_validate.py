"""Calibration/holdout validation of the BG/NBD churn model (``membercare churn validate``).

The model is fitted on purchases up to ``calibration_end`` and checked against what the customers then did up to
``holdout_end``, as in Fader, Hardie and Lee (2005), figures 2-4:

* **Tracking of cumulative repeat transactions** per week: the actual count (purchase days after each customer's
  first, same-day purchases merged) against ``sum_i E[X(t - s_i)]`` (FHL eq. 7 for a customer who made the first
  purchase at ``s_i``; weeks since the start of the cohort's first week). On the CDNOW sample: actual 4,339 and
  predicted 4,166 cumulative repeat purchases at week 78 (FHL report about 4,160; BG/NBD under-forecasts by ~4 %).
* **Conditional expectations**: mean holdout purchases per calibration purchase count ``x`` (0..7+), actual
  against the mean of ``E[Y(holdout) | x, t_x, T]`` (FHL eq. 10).
* **Churn flags**: who the model flags and how many of them did buy in the holdout, against the share the model
  implies. The old rule (repeat buyers with P(alive) < 0.5) against the value-at-risk rule
  (P(no purchase in the holdout) >= ``p_silent``, single buyers included).

Pure numpy/scipy on ``(customer, date)`` pairs from a transaction file; the shop's own data goes through the same
reader as ``membercare churn fit`` (``cdnow`` or ``orders-csv``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np

from membercare.errors import InputError
from segments import churn, cltv

MAX_X_SHOWN = 7


@dataclass(frozen=True)
class FlagCheck:
    rule: str
    flagged: int
    bought_in_holdout: float  # share of the flagged who made a repeat purchase in the holdout
    implied: float  # the share the model implies (mean P(some purchase in the holdout) over the flagged)


@dataclass(frozen=True)
class Validation:
    params: churn.BGNBDParams
    calibration_end: str
    holdout_end: str
    customers: int
    weeks: list[int]
    actual_cumulative: list[float]
    predicted_cumulative: list[float]
    conditional: list[dict]  # {"x": "0".."7+", "customers", "actual", "predicted"}
    holdout_actual: int
    holdout_predicted: float
    flags: list[FlagCheck]

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def final_error(self) -> float:
        """Relative error of the predicted cumulative repeat transactions at the last week."""
        return self.predicted_cumulative[-1] / self.actual_cumulative[-1] - 1.0


def _days(rows: Iterable[tuple[str, date]], holdout_end: date) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    end = holdout_end.toordinal()
    for customer, d in rows:
        if d.toordinal() <= end:
            out.setdefault(customer, set()).add(d.toordinal())
    return {c: sorted(v) for c, v in out.items()}


def validate(rows: Iterable[tuple[str, date]], calibration_end: date, holdout_end: date, *,
             p_silent: float = 0.5) -> Validation:
    """Fit on the calibration period (customers whose first purchase is in it) and check the holdout."""
    if holdout_end <= calibration_end:
        raise InputError("the holdout must end after the calibration period")
    cal = calibration_end.toordinal()
    days = {c: d for c, d in _days(rows, holdout_end).items() if d[0] <= cal}
    if not days:
        raise InputError(f"no customer made a first purchase on or before {calibration_end.isoformat()}")
    first = np.array([d[0] for d in days.values()], dtype=float)
    in_cal = [[x for x in d if x <= cal] for d in days.values()]
    x = np.array([len(d) - 1 for d in in_cal], dtype=float)
    t_x = np.array([(d[-1] - d[0]) / churn.DAYS_PER_PERIOD for d in in_cal])
    T = (cal - first) / churn.DAYS_PER_PERIOD
    holdout = np.array([sum(1 for v in d if v > cal) for d in days.values()], dtype=float)
    params = churn.fit(churn.Summary.from_arrays(x, t_x, T))

    start = int(first.min())  # the cohort's first day: week 1 starts here
    n_weeks = int(np.ceil((holdout_end.toordinal() - start + 1) / churn.DAYS_PER_PERIOD))
    weeks = list(range(1, n_weeks + 1))
    repeat_days = np.array([v for d in days.values() for v in d[1:]], dtype=float)
    actual = [float(np.sum(repeat_days < start + 7 * w)) for w in weeks]
    s = (first - start) / churn.DAYS_PER_PERIOD
    # E[X(t)] on a grid of distinct first days (FHL's cohort tracking); the ``t`` of a customer at the end of
    # week w is w - s_i weeks (day counts, consistent with T above).
    uniq, counts = np.unique(s, return_counts=True)
    predicted = []
    for w in weeks:
        t = w - uniq
        live = t > 0
        predicted.append(float(sum(c * churn.expected_purchases_new(params, float(tt))
                                   for tt, c in zip(t[live], counts[live], strict=True))))

    horizon = (holdout_end.toordinal() - cal) / churn.DAYS_PER_PERIOD
    cond_pred = churn.expected_purchases(params, horizon, x, t_x, T)
    conditional = []
    for k in range(MAX_X_SHOWN + 1):
        sel = (x == k) if k < MAX_X_SHOWN else (x >= k)
        if sel.any():
            conditional.append({"x": f"{k}+" if k == MAX_X_SHOWN else str(k), "customers": int(sel.sum()),
                                "actual": float(holdout[sel].mean()), "predicted": float(cond_pred[sel].mean())})

    silent = cltv.p_no_purchase(params, horizon, x, t_x, T)
    bought = holdout > 0
    flags = []
    for rule, sel in (("repeat buyers with P(alive) < 0.5 (old churn_risk)",
                       (x > 0) & (churn.p_alive(params, x, t_x, T) < 0.5)),
                      (f"P(no purchase in the holdout) >= {p_silent:g}, single buyers included", silent >= p_silent)):
        n = int(sel.sum())
        flags.append(FlagCheck(rule, n, float(bought[sel].mean()) if n else 0.0,
                               float((1.0 - silent[sel]).mean()) if n else 0.0))
    return Validation(params, calibration_end.isoformat(), holdout_end.isoformat(), len(days), weeks, actual,
                      predicted, conditional, int(holdout.sum()), float(cond_pred.sum()), flags)


def validate_file(path: Path, fmt: str, calibration_end: date, holdout_end: date, *,
                  p_silent: float = 0.5) -> Validation:
    readers = {"cdnow": churn.read_cdnow, "orders-csv": churn.read_orders_csv}
    if fmt not in readers:
        from membercare.errors import UnknownNameError

        raise UnknownNameError("transactions format", fmt, readers)
    if not Path(path).is_file():
        raise InputError(f"no such file: {path}")
    return validate(readers[fmt](Path(path)), calibration_end, holdout_end, p_silent=p_silent)


__all__ = ["FlagCheck", "Validation", "validate", "validate_file"]
