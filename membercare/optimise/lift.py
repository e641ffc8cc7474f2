"""Treated-versus-holdout lift with confidence intervals.

Two outcome kinds, each computed from aggregates that a report can get from one SQL ``GROUP BY``:

* **Binary outcomes** (visited, clicked, converted): :func:`binary_lift` from ``(successes, members)``
  per arm. Absolute difference of rates with Newcombe's hybrid score interval (1998, method 10: the
  difference of Wilson score intervals), the default; or the Wald interval. Relative lift
  ``p_t / p_c - 1`` with the Katz log interval for the risk ratio. Two-sided p-value of the pooled
  two-proportion z-test (identical to Pearson's chi-square test without continuity correction).
* **Continuous outcomes** (revenue per member, in minor units, zero for members who bought nothing):
  :func:`mean_lift` from :class:`MeanSummary` per arm (``n``, sum, sum of squares). Welch's unequal-variance
  t interval and test for the difference of means; relative lift ``m_t / m_c - 1`` with a delta-method
  interval on ``log(m_t / m_c)``. Revenue is zero-inflated and skewed, but the interval is for the
  *mean*, and with thousands of members per arm the central limit theorem makes it accurate; below a few
  hundred members per arm, or when a handful of orders dominate the revenue, treat it as approximate.

The formulas, assumptions and a worked check against the Hillstrom e-mail experiment are in
``docs/optimisation.md``. Everything here is pure (numpy/scipy), so flows and the CLI can share it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

Interval = tuple[float, float]


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a proportion; ``(nan, nan)`` when ``n == 0``.

    Preferred over the Wald interval because it stays inside [0, 1] and keeps its coverage for rare
    events (conversion rates of 0.5 %) and small groups.
    """
    _check_counts(successes, n)
    if n == 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At x = 0 (x = n) the lower (upper) bound is exactly 0 (1); set it rather than keep float noise.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


@dataclass(frozen=True)
class BinaryLift:
    """Lift of a binary outcome. Rates are fractions (0.0766 = 7.66 percentage points)."""

    treated_n: int
    treated_successes: int
    control_n: int
    control_successes: int
    treated_rate: float
    control_rate: float
    treated_rate_ci: Interval
    control_rate_ci: Interval
    absolute_lift: float  # treated_rate - control_rate
    absolute_lift_ci: Interval
    relative_lift: float | None  # treated_rate / control_rate - 1; None when the control rate is 0
    relative_lift_ci: tuple[float, float] | None
    p_value: float
    significant: bool
    confidence: float
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def binary_lift(
    treated_successes: int,
    treated_n: int,
    control_successes: int,
    control_n: int,
    *,
    confidence: float = 0.95,
    method: Literal["newcombe", "wald"] = "newcombe",
) -> BinaryLift:
    """Compare a binary outcome between the treated group and the holdout (control).

    ``significant`` is ``p_value < 1 - confidence`` from the pooled z-test. The Newcombe interval is not
    the inversion of that test, so when the p-value sits right at the threshold the interval may just
    touch zero; at campaign sizes this is vanishingly rare and the report shows both numbers.
    """
    xt, nt, xc, nc = int(treated_successes), int(treated_n), int(control_successes), int(control_n)
    _check_counts(xt, nt)
    _check_counts(xc, nc)
    if nt == 0 or nc == 0:
        raise ValueError("both groups need at least one member")
    z = _z(confidence)
    pt, pc = xt / nt, xc / nc
    diff = pt - pc
    ci_t = wilson_interval(xt, nt, confidence)
    ci_c = wilson_interval(xc, nc, confidence)
    if method == "newcombe":
        # Newcombe (1998) method 10: combine each arm's distance to its own Wilson bounds.
        lt, ut = ci_t
        lc, uc = ci_c
        lo = diff - math.sqrt((pt - lt) ** 2 + (uc - pc) ** 2)
        hi = diff + math.sqrt((ut - pt) ** 2 + (pc - lc) ** 2)
    elif method == "wald":
        se = math.sqrt(pt * (1 - pt) / nt + pc * (1 - pc) / nc)
        lo, hi = diff - z * se, diff + z * se
    else:
        raise ValueError(f"unknown method {method!r}; valid choices: newcombe, wald")

    rel, rel_ci = _katz(xt, nt, xc, nc, z)

    pooled = (xt + xc) / (nt + nc)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / nt + 1 / nc))
    if se0 == 0.0:
        p_value = 1.0  # both arms all-0 or all-1: no evidence of any difference
    else:
        p_value = float(2.0 * stats.norm.sf(abs(diff) / se0))
    return BinaryLift(
        treated_n=nt, treated_successes=xt, control_n=nc, control_successes=xc,
        treated_rate=pt, control_rate=pc, treated_rate_ci=ci_t, control_rate_ci=ci_c,
        absolute_lift=diff, absolute_lift_ci=(lo, hi),
        relative_lift=rel, relative_lift_ci=rel_ci,
        p_value=p_value, significant=p_value < 1.0 - confidence,
        confidence=confidence, method=method,
    )


def _katz(xt: int, nt: int, xc: int, nc: int, z: float) -> tuple[float | None, Interval | None]:
    """Relative lift (risk ratio - 1) with the Katz log interval.

    A zero count makes log(RR) infinite; then 0.5 is added to both arms' successes and members
    (Haldane-Anscombe) for the *interval* only. With no successes in the control arm the point estimate
    is undefined and None is returned.
    """
    if xc == 0:
        return None, None
    rr = (xt / nt) / (xc / nc)
    a, b, c, d = float(xt), float(nt), float(xc), float(nc)
    if xt == 0:
        a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    log_rr = math.log((a / b) / (c / d))
    se = math.sqrt(1 / a - 1 / b + 1 / c - 1 / d)
    return rr - 1.0, (math.exp(log_rr - z * se) - 1.0, math.exp(log_rr + z * se) - 1.0)


@dataclass(frozen=True)
class MeanSummary:
    """Sufficient statistics of a continuous outcome in one arm."""

    n: int
    mean: float
    variance: float  # unbiased sample variance (ddof = 1)

    @classmethod
    def from_values(cls, values: npt.ArrayLike) -> MeanSummary:
        v = np.asarray(values, dtype=float)
        if v.ndim != 1 or v.size == 0:
            raise ValueError("need a non-empty 1-D array of values")
        return cls(n=int(v.size), mean=float(v.mean()), variance=float(v.var(ddof=1)) if v.size > 1 else 0.0)

    @classmethod
    def from_sums(cls, n: int, total: float, total_of_squares: float) -> MeanSummary:
        """From SQL aggregates ``COUNT(*)``, ``SUM(x)``, ``SUM(x*x)``.

        With integer money (minor units) the sums are exact integers, and the variance numerator
        ``n*Σx² - (Σx)²`` is computed in exact integer arithmetic: no catastrophic cancellation.
        """
        n = int(n)
        if n <= 0:
            raise ValueError("n must be positive")
        num: float
        if float(total).is_integer() and float(total_of_squares).is_integer():
            num = n * int(total_of_squares) - int(total) ** 2
        else:
            num = n * float(total_of_squares) - float(total) ** 2
        variance = max(num, 0) / (n * (n - 1)) if n > 1 else 0.0
        return cls(n=n, mean=float(total) / n, variance=float(variance))


@dataclass(frozen=True)
class MeanLift:
    """Lift of a continuous outcome (e.g. revenue per member, in the unit of the input)."""

    treated: MeanSummary
    control: MeanSummary
    absolute_lift: float
    absolute_lift_ci: Interval
    relative_lift: float | None
    relative_lift_ci: Interval | None
    degrees_of_freedom: float
    p_value: float
    significant: bool
    confidence: float
    method: str = "welch"

    def to_dict(self) -> dict:
        return asdict(self)


def mean_lift(treated: MeanSummary, control: MeanSummary, *, confidence: float = 0.95) -> MeanLift:
    """Welch's t interval and test for ``mean_t - mean_c``; delta-method interval for the relative lift."""
    if treated.n < 2 or control.n < 2:
        raise ValueError("each group needs at least two members")
    _z(confidence)
    vt, vc = treated.variance / treated.n, control.variance / control.n
    diff = treated.mean - control.mean
    se = math.sqrt(vt + vc)
    if se == 0.0:
        df = float(treated.n + control.n - 2)
        p_value = 1.0 if diff == 0 else 0.0
        ci = (diff, diff)
    else:
        # Welch-Satterthwaite degrees of freedom.
        df = (vt + vc) ** 2 / (vt**2 / (treated.n - 1) + vc**2 / (control.n - 1))
        tq = float(stats.t.ppf(0.5 + confidence / 2.0, df))
        ci = (diff - tq * se, diff + tq * se)
        p_value = float(2.0 * stats.t.sf(abs(diff) / se, df))

    rel = rel_ci = None
    if control.mean > 0 and treated.mean > 0:
        rel = treated.mean / control.mean - 1.0
        # Var(log m) ~= Var(m) / m^2 (first-order delta method), arms independent.
        se_log = math.sqrt(vt / treated.mean**2 + vc / control.mean**2)
        z = _z(confidence)
        log_ratio = math.log(treated.mean / control.mean)
        rel_ci = (math.exp(log_ratio - z * se_log) - 1.0, math.exp(log_ratio + z * se_log) - 1.0)
    elif control.mean > 0:
        rel = treated.mean / control.mean - 1.0
    return MeanLift(
        treated=treated, control=control, absolute_lift=diff, absolute_lift_ci=ci,
        relative_lift=rel, relative_lift_ci=rel_ci, degrees_of_freedom=float(df),
        p_value=p_value, significant=p_value < 1.0 - confidence, confidence=confidence,
    )


# --- the Hillstrom experiment ------------------------------------------------------------------------


HILLSTROM_ARMS = ("Mens E-Mail", "Womens E-Mail", "No E-Mail")


@dataclass(frozen=True)
class HillstromData:
    """The Hillstrom MineThatData e-mail experiment as column arrays (one element per customer).

    ``customer`` is the 1-based row number (a stable synthetic member id). ``spend_minor`` is the
    two-week spend in cents. :mod:`membercare.optimise.hillstrom` loads the file as members, messages (the
    two e-mail arms, the No E-Mail group as their holdout) and outcomes (visits, orders) for the ordinary
    report; this in-memory form is the reference it is checked against.
    """

    customer: np.ndarray  # int64
    segment: np.ndarray  # object: "Mens E-Mail" / "Womens E-Mail" / "No E-Mail"
    recency: np.ndarray  # int64, months since last purchase
    history_minor: np.ndarray  # int64, cents spent in the past year
    mens: np.ndarray  # bool
    womens: np.ndarray  # bool
    zip_code: np.ndarray  # object: Urban / Surburban (sic, as in the file) / Rural
    newbie: np.ndarray  # bool
    channel: np.ndarray  # object: Phone / Web / Multichannel
    visit: np.ndarray  # bool
    conversion: np.ndarray  # bool
    spend_minor: np.ndarray  # int64, cents

    def __len__(self) -> int:
        return int(self.customer.size)

    def arm(self, segment: str) -> np.ndarray:
        if segment not in HILLSTROM_ARMS:
            raise ValueError(f"unknown arm {segment!r}; valid choices: {', '.join(HILLSTROM_ARMS)}")
        return self.segment == segment

    def records(self) -> Iterator[dict[str, int | bool | str]]:
        """One plain-Python dict per customer (numpy scalars unwrapped), in file order."""
        names = [f for f in self.__dataclass_fields__]
        cols = [getattr(self, f) for f in names]
        for row in zip(*cols, strict=True):
            yield {n: (v.item() if hasattr(v, "item") else v) for n, v in zip(names, row, strict=True)}


def load_hillstrom(path: str | PathLike[str]) -> HillstromData:
    """Read ``hillstrom.csv`` or the ``hillstrom.csv.zip`` that holds it (about 0.2 s for 64,000 rows)."""
    import csv
    import io
    import zipfile
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".csv"))
            text = zf.read(member).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError(f"{path.name}: no rows")

    def col(name, conv, dtype):
        return np.array([conv(r[name]) for r in rows], dtype=dtype)

    def cents(s: str) -> int:
        return int(round(float(s) * 100))

    return HillstromData(
        customer=np.arange(1, len(rows) + 1, dtype=np.int64),
        segment=col("segment", str, object),
        recency=col("recency", int, np.int64),
        history_minor=col("history", cents, np.int64),
        mens=col("mens", lambda s: s == "1", bool),
        womens=col("womens", lambda s: s == "1", bool),
        zip_code=col("zip_code", str, object),
        newbie=col("newbie", lambda s: s == "1", bool),
        channel=col("channel", str, object),
        visit=col("visit", lambda s: s == "1", bool),
        conversion=col("conversion", lambda s: s == "1", bool),
        spend_minor=col("spend", cents, np.int64),
    )


def hillstrom_lift(data: HillstromData, treated: str = "Mens E-Mail", control: str = "No E-Mail",
                   *, confidence: float = 0.95) -> dict[str, BinaryLift | MeanLift]:
    """Visit, conversion and spend-per-customer lift of one Hillstrom arm over another."""
    t, c = data.arm(treated), data.arm(control)
    out: dict[str, BinaryLift | MeanLift] = {}
    for name in ("visit", "conversion"):
        y = getattr(data, name)
        out[name] = binary_lift(int(y[t].sum()), int(t.sum()), int(y[c].sum()), int(c.sum()), confidence=confidence)
    s = data.spend_minor
    out["spend_minor"] = mean_lift(
        MeanSummary.from_sums(int(t.sum()), int(s[t].sum()), int((s[t] ** 2).sum())),
        MeanSummary.from_sums(int(c.sum()), int(s[c].sum()), int((s[c] ** 2).sum())),
        confidence=confidence,
    )
    return out
