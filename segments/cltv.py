"""Customer lifetime value: the Gamma-Gamma spend model on top of BG/NBD, numpy/scipy only.

Spend (Fader, Hardie and Lee, "RFM and CLV: Using Iso-Value Curves for Customer Base Analysis", JMR 2005, and
Fader and Hardie, "The Gamma-Gamma Model of Monetary Value", 2013): a customer's transaction values are Gamma(p, nu)
around their own mean ``p / nu``, and ``nu ~ Gamma(q, gamma)`` across customers. A repeat buyer is summarised by
``x`` (repeat purchase days) and ``m`` (the mean value of those ``x`` repeat purchase days; the first purchase is
left out, as in the literature, because it is often atypical). The model assumes spend independent of the purchase
process. Single buyers (``x = 0``) carry no spend information of their own: their expected spend is the population
mean ``p gamma / (q - 1)``.

Value: the discounted expected residual lifetime value of a customer is
``sum_k (E[Y(t_k)] - E[Y(t_(k-1))]) * E[spend] / (1 + d)^k`` over monthly steps ``t_k`` of a horizon (BG/NBD
conditional expectations, :func:`segments.churn.expected_purchases`), with monthly discount ``d`` from an annual
rate. Risk: ``P(no purchase in the next t | x, t_x, T) = P(dead) + P(alive) * ((alpha+T)/(alpha+T+t))^(r+x)``
(a live customer's rate is Gamma(r+x, alpha+T) a posteriori); value at risk is that probability times the value.

On the CDNOW sample's 946 repeat buyers (calibration weeks 1-39) the fit reproduces the published p = 6.25,
q = 3.74, gamma = 15.44 (``tests/test_cltv.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special

from membercare.errors import InputError
from segments.churn import DAYS_PER_PERIOD, BGNBDParams, _odds_dead, expected_purchases

WEEKS_PER_MONTH = 365.25 / 12.0 / DAYS_PER_PERIOD


@dataclass(frozen=True)
class GammaGammaParams:
    p: float
    q: float
    gamma: float
    log_likelihood: float
    customers: int
    converged: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def gamma_gamma_log_likelihood_terms(p: float, q: float, gamma: float, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per-customer log-likelihood of the mean spend ``m`` over ``x`` transactions (``x >= 1``), dropping the terms
    that do not depend on the parameters (so values match the usual implementations up to a constant)."""
    px = p * x
    return (special.gammaln(px + q) - special.gammaln(px) - special.gammaln(q) + q * np.log(gamma)
            + (px - 1.0) * np.log(m) + px * np.log(x) - (px + q) * np.log(gamma + m * x))


def fit_gamma_gamma(x: ArrayLike, m: ArrayLike, weight: ArrayLike | None = None) -> GammaGammaParams:
    """Maximum-likelihood ``(p, q, gamma)`` on repeat buyers (rows with ``x >= 1`` and ``m > 0``; others are
    ignored). Raises :class:`InputError` with fewer than 10 such customers."""
    x, m = np.asarray(x, dtype=float), np.asarray(m, dtype=float)
    w = np.ones_like(x) if weight is None else np.asarray(weight, dtype=float)
    keep = (x >= 1) & (m > 0)
    x, m, w = x[keep], m[keep], w[keep]
    total = float(w.sum())
    if total < 10:
        raise InputError("the spend model needs at least 10 repeat buyers with a positive spend")

    def objective(logp: np.ndarray) -> float:
        p, q, g = np.exp(np.clip(logp, -30, 30))
        ll = float(np.dot(w, gamma_gamma_log_likelihood_terms(p, q, g, x, m)))
        return -ll / total if np.isfinite(ll) else 1e300

    start = np.log([1.0, 2.0, float(np.average(m, weights=w))])
    res = optimize.minimize(objective, start, method="L-BFGS-B", bounds=[(-15, 15)] * 3)
    if not res.success:
        polished = optimize.minimize(objective, res.x, method="Nelder-Mead",
                                     options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000})
        res = polished if polished.fun <= res.fun else res
    p, q, g = (float(v) for v in np.exp(res.x))
    return GammaGammaParams(p, q, g, -float(res.fun) * total, int(round(total)), bool(res.success))


def expected_spend(gg: GammaGammaParams, x: ArrayLike, m: ArrayLike) -> np.ndarray:
    """E[mean transaction value | x, m] = ``(gamma + m x) p / (p x + q - 1)``: a weighted average of the population
    mean ``p gamma / (q - 1)`` and the customer's own mean (the population mean when ``x = 0``). Needs ``q > 1``."""
    if gg.q <= 1:
        raise InputError(f"the spend model has q = {gg.q:.3f} <= 1: the population mean spend is infinite")
    x, m = np.asarray(x, dtype=float), np.asarray(m, dtype=float)
    m = np.where(x > 0, m, 0.0)
    return (gg.gamma + m * x) * gg.p / (gg.p * x + gg.q - 1.0)


def p_no_purchase(bg: BGNBDParams, t: float, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> np.ndarray:
    """P(no purchase in the next ``t`` periods | x, t_x, T) under BG/NBD (single buyers included)."""
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    odds = _odds_dead(bg, x, t_x, T)
    alive = 1.0 / (1.0 + odds)
    silent = np.exp((bg.r + x) * (np.log(bg.alpha + T) - np.log(bg.alpha + T + t)))
    return (1.0 - alive) + alive * silent


def discounted_expected_transactions(bg: BGNBDParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, *,
                                     months: int = 12, annual_discount: float = 0.10) -> np.ndarray:
    """``sum_k (E[Y(k months)] - E[Y((k-1) months)]) / (1 + d)^k`` with ``d`` the monthly rate of ``annual_discount``
    (periods are weeks; a month is 365.25/12 days)."""
    if months < 1:
        raise InputError("the value horizon needs at least one month")
    monthly = (1.0 + annual_discount) ** (1.0 / 12.0) - 1.0
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    out = np.zeros(np.broadcast(x, t_x, T).shape)
    before = np.zeros_like(out)
    for k in range(1, months + 1):
        now = expected_purchases(bg, k * WEEKS_PER_MONTH, x, t_x, T)
        out += (now - before) / (1.0 + monthly) ** k
        before = now
    return out


def residual_value(bg: BGNBDParams, gg: GammaGammaParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, m: ArrayLike,
                   *, months: int = 12, annual_discount: float = 0.10) -> np.ndarray:
    """Discounted expected residual lifetime value over ``months``: transactions times expected spend."""
    det = discounted_expected_transactions(bg, x, t_x, T, months=months, annual_discount=annual_discount)
    return det * expected_spend(gg, x, m)


# --------------------------------------------------------------------------------------------
# CDNOW spend (the published check)


def spend_summary_cdnow(path: Path, calibration_end: date) -> tuple[np.ndarray, np.ndarray]:
    """``(x, m)`` per customer of a CDNOW file: repeat purchase days up to ``calibration_end`` and the mean value of
    those days (same-day purchases summed; the first day left out; ``m = 0`` for single buyers)."""
    days: dict[str, dict[int, float]] = {}
    end = calibration_end.toordinal()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or not parts[0].isdigit():
                continue
            if len(parts) not in (4, 5):
                raise InputError(f"{path}:{lineno}: expected 4 or 5 whitespace-separated columns, got {len(parts)}")
            try:
                day = datetime.strptime(parts[-3], "%Y%m%d").date().toordinal()
                value = float(parts[-1])
            except ValueError:
                raise InputError(f"{path}:{lineno}: bad date or value") from None
            if day <= end:
                per = days.setdefault(parts[0], {})
                per[day] = per.get(day, 0.0) + value
    x = np.array([len(d) - 1 for d in days.values()], dtype=float)
    m = np.array([np.mean([v for k, v in sorted(d.items())[1:]]) if len(d) > 1 else 0.0 for d in days.values()])
    return x, m


__all__ = ["GammaGammaParams", "discounted_expected_transactions", "expected_spend", "fit_gamma_gamma",
           "gamma_gamma_log_likelihood_terms", "p_no_purchase", "residual_value", "spend_summary_cdnow"]
