"""BG/NBD ("beta-geometric / negative binomial") buy-till-you-die model, fitted with numpy/scipy.

Reference: Fader, Hardie and Lee, "Counting Your Customers the Easy Way: An Alternative to the
Pareto/NBD Model", Marketing Science 24(2), 2005 (FHL below). The model, per customer:

* while alive, purchases follow a Poisson process with rate lambda ~ Gamma(r, alpha);
* after every purchase the customer drops out with probability p ~ Beta(a, b).

A customer is summarised by ``x`` (repeat purchases: purchase *days* after the first, same-day
orders merged), ``t_x`` (time of the last purchase since the first) and ``T`` (time since the first
purchase at the end of the calibration period). Times are in *periods*; we use weeks (days / 7)
everywhere, as the literature does, so fitted parameters are comparable with published ones.

Everything here works on arrays, optionally with a ``weight`` per row: the shop's summary is
grouped by ``(x, t_x, T)`` in SQL, so a million members collapse into far fewer distinct rows and
the fit never needs one Python object per member.

We do not use the ``lifetimes`` package: it is unmaintained and breaks on current pandas. The
likelihood below is FHL equation (6), evaluated in log space (``gammaln``/``betaln``/``logaddexp``)
so that large ``x`` or ``T`` neither overflow nor lose precision.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special

from membercare.errors import InputError

DAYS_PER_PERIOD = 7.0


@dataclass(frozen=True)
class Summary:
    """Per-customer (or per distinct-row) BG/NBD summary statistics, in periods (weeks)."""

    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray
    weight: np.ndarray

    @property
    def customers(self) -> int:
        return int(round(float(self.weight.sum())))

    @classmethod
    def from_arrays(cls, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weight: ArrayLike | None = None) -> Summary:
        x = np.asarray(x, dtype=float)
        t_x = np.asarray(t_x, dtype=float)
        T = np.asarray(T, dtype=float)
        w = np.ones_like(x) if weight is None else np.asarray(weight, dtype=float)
        if not (x.shape == t_x.shape == T.shape == w.shape):
            raise ValueError("x, t_x, T and weight must have the same shape")
        if np.any(x < 0) or np.any(t_x < 0) or np.any(T < t_x) or np.any((x == 0) & (t_x != 0)):
            raise ValueError("invalid BG/NBD summary: need x >= 0, 0 <= t_x <= T, and t_x = 0 when x = 0")
        return cls(x, t_x, T, w)


@dataclass(frozen=True)
class BGNBDParams:
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    converged: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def log_likelihood_terms(r: float, alpha: float, a: float, b: float, s: Summary) -> np.ndarray:
    """Per-row log-likelihood of FHL eq. (6) (unweighted)."""
    x, t_x, T = s.x, s.t_x, s.T
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    a2 = special.betaln(a, b + x) - special.betaln(a, b)
    a3 = -(r + x) * np.log(alpha + T)
    repeat = x > 0
    # ln(a / (b + x - 1)) - (r + x) ln(alpha + t_x), defined only for repeat buyers.
    a4 = np.full_like(x, -np.inf)
    xr = x[repeat]
    a4[repeat] = np.log(a) - np.log(b + xr - 1.0) - (r + xr) * np.log(alpha + t_x[repeat])
    return a1 + a2 + np.logaddexp(a3, a4)


def log_likelihood(r: float, alpha: float, a: float, b: float, s: Summary) -> float:
    return float(np.dot(s.weight, log_likelihood_terms(r, alpha, a, b, s)))


# Starting points on log scale for (r, alpha, a, b); the likelihood surface is well behaved but the
# scale of alpha depends on the period length and the shop, so we try a few and keep the best.
_STARTS = (
    (1.0, 1.0, 1.0, 1.0),
    (0.5, 5.0, 0.5, 2.0),
    (0.2, 20.0, 1.0, 5.0),
    (2.0, 50.0, 2.0, 10.0),
)


def fit(s: Summary, *, starts: Iterable[tuple[float, float, float, float]] = _STARTS) -> BGNBDParams:
    """Maximum-likelihood estimates of (r, alpha, a, b).

    Optimises the mean weighted negative log-likelihood over log-parameters with L-BFGS-B (so all
    four stay positive without constraints), from several starting points, keeping the best (and
    polishing it with Nelder-Mead if L-BFGS-B did not report convergence). Raises :class:`InputError` when
    there is nothing to fit.
    """
    total = float(s.weight.sum())
    if total <= 0 or len(s.x) == 0:
        raise InputError("no customers with purchases to fit the churn model on")
    if not np.any(s.x > 0):
        raise InputError("no repeat buyers: the churn model needs customers with at least two purchase days")

    def objective(logp: np.ndarray) -> float:
        r, alpha, a, b = np.exp(np.clip(logp, -30, 30))
        ll = log_likelihood(r, alpha, a, b, s)
        return -ll / total if np.isfinite(ll) else 1e300

    best = None
    for start in starts:
        res = optimize.minimize(objective, np.log(start), method="L-BFGS-B", bounds=[(-15, 15)] * 4)
        if best is None or res.fun < best.fun:
            best = res
    if best is None:
        raise InputError("no starting point to fit from")
    if not best.success:
        # L-BFGS-B stopped on its line search (flat ridges happen with few repeat buyers): a
        # derivative-free polish from there is cheap insurance.
        polished = optimize.minimize(objective, best.x, method="Nelder-Mead",
                                     options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000})
        if polished.fun <= best.fun:
            best = polished
    r, alpha, a, b = (float(v) for v in np.exp(best.x))
    return BGNBDParams(r=r, alpha=alpha, a=a, b=b, log_likelihood=log_likelihood(r, alpha, a, b, s),
                       customers=s.customers, converged=bool(best.success))


def _odds_dead(p: BGNBDParams, x, t_x, T) -> np.ndarray:
    """(a / (b + x - 1)) * ((alpha + T) / (alpha + t_x))^(r + x) for x > 0, else 0 (computed in log space)."""
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    out = np.zeros(np.broadcast(x, t_x, T).shape)
    x, t_x, T = np.broadcast_arrays(x, t_x, T)
    rep = x > 0
    with np.errstate(over="ignore"):
        out[rep] = np.exp(np.log(p.a) - np.log(p.b + x[rep] - 1.0)
                          + (p.r + x[rep]) * (np.log(p.alpha + T[rep]) - np.log(p.alpha + t_x[rep])))
    return out


def p_alive(p: BGNBDParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> np.ndarray:
    """P(customer still alive | x, t_x, T), FHL eq. (13).

    Note the model's known property: a customer with no repeat purchase (x = 0) is always "alive"
    (p = 1), because in BG/NBD dropout can only happen right after a purchase. Callers that want
    churn risk therefore look at repeat buyers (see ``docs/segments.md``).
    """
    return 1.0 / (1.0 + _odds_dead(p, x, t_x, T))


def expected_purchases(p: BGNBDParams, t: float, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> np.ndarray:
    """E[Y(t) | x, t_x, T]: expected purchases in the next ``t`` periods, FHL eq. (10)."""
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    r, alpha, a, b = p.r, p.alpha, p.a, p.b
    z = t / (alpha + T + t)
    hyp = special.hyp2f1(r + x, b + x, a + b + x - 1.0, z)
    head = (a + b + x - 1.0) / (a - 1.0)
    body = 1.0 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t))) * hyp
    return head * body / (1.0 + _odds_dead(p, x, t_x, T))


def expected_purchases_new(p: BGNBDParams, t: float) -> float:
    """E[X(t)] for a randomly chosen new customer, FHL eq. (7) (used to sanity-check fits)."""
    r, alpha, a, b = p.r, p.alpha, p.a, p.b
    z = t / (alpha + t)
    return float((a + b - 1.0) / (a - 1.0) * (1.0 - (alpha / (alpha + t)) ** r * special.hyp2f1(r, b, a + b - 1.0, z)))


# --------------------------------------------------------------------------------------------
# Building summaries from transaction files (``membercare churn fit``)


def summarise_transactions(rows: Iterable[tuple[str, date]], calibration_end: date) -> Summary:
    """Summary statistics from ``(customer, purchase date)`` pairs.

    Purchases after ``calibration_end`` are ignored; purchases on the same day are one purchase;
    ``T`` runs from a customer's first purchase to ``calibration_end`` (inclusive day count
    difference, as in the CDNOW calibration of FHL: 1997-01-01 to 1997-09-30 is 272 days = 38.86 weeks).
    """
    days: dict[str, set[int]] = {}
    end = calibration_end.toordinal()
    for customer, d in rows:
        o = d.toordinal()
        if o <= end:
            days.setdefault(customer, set()).add(o)
    if not days:
        raise InputError(f"no purchases on or before the calibration end {calibration_end.isoformat()}")
    n = len(days)
    x, t_x, T = np.empty(n), np.empty(n), np.empty(n)
    for i, ds in enumerate(days.values()):
        first, last = min(ds), max(ds)
        x[i] = len(ds) - 1
        t_x[i] = (last - first) / DAYS_PER_PERIOD
        T[i] = (end - first) / DAYS_PER_PERIOD
    return Summary.from_arrays(x, t_x, T)


def read_cdnow(path: Path) -> Iterable[tuple[str, date]]:
    """CDNOW transactions: the 5-column sample (master id, sample id, YYYYMMDD, cds, dollars) or
    the 4-column master file with its header (customer_id, date, number_of_cds, dollar_value)."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or not parts[0].isdigit():
                continue  # blank line or the master file's header
            if len(parts) not in (4, 5):
                raise InputError(f"{path}:{lineno}: expected 4 or 5 whitespace-separated columns, got {len(parts)}")
            customer, day = parts[0], parts[-3]
            try:
                yield customer, datetime.strptime(day, "%Y%m%d").date()
            except ValueError:
                raise InputError(f"{path}:{lineno}: bad date {day!r} (want YYYYMMDD)") from None


_CUSTOMER_COLUMNS = ("member_id", "customer_id", "external_id", "member")
_DATE_COLUMNS = ("placed_at", "date", "order_date", "purchased_at")


def read_orders_csv(path: Path) -> Iterable[tuple[str, date]]:
    """An orders CSV with a header: a customer column (one of ``member_id``, ``customer_id``,
    ``external_id``, ``member``), a date column (``placed_at``, ``date``, ...; ISO date or datetime)
    and optionally ``status``, where cancelled and refunded orders are skipped (they are not purchases)."""
    from membercare.models import NON_PURCHASE_STATUSES

    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        cust = next((c for c in _CUSTOMER_COLUMNS if c in header), None)
        when = next((c for c in _DATE_COLUMNS if c in header), None)
        if cust is None or when is None:
            raise InputError(
                f"{path}: need a customer column ({', '.join(_CUSTOMER_COLUMNS)}) and a date column "
                f"({', '.join(_DATE_COLUMNS)}); found: {', '.join(header) or '(no header)'}"
            )
        for lineno, row in enumerate(reader, 2):
            if (row.get("status") or "").strip().lower() in NON_PURCHASE_STATUSES:
                continue
            text = (row[when] or "").strip()
            try:
                if len(text) == 8 and text.isdigit():
                    d = datetime.strptime(text, "%Y%m%d").date()
                elif len(text) == 10:
                    d = date.fromisoformat(text)
                else:
                    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
                    d = dt.astimezone(UTC).date() if dt.tzinfo else dt.date()
            except ValueError:
                raise InputError(f"{path}:{lineno}: bad date {text!r}") from None
            yield row[cust].strip(), d


def fit_file(path: Path, fmt: str, calibration_end: date) -> BGNBDParams:
    readers = {"cdnow": read_cdnow, "orders-csv": read_orders_csv}
    if fmt not in readers:
        from membercare.errors import UnknownNameError

        raise UnknownNameError("transactions format", fmt, readers)
    if not Path(path).is_file():
        raise InputError(f"no such file: {path}")
    return fit(summarise_transactions(readers[fmt](Path(path)), calibration_end))

