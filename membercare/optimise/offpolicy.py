"""Off-policy evaluation: the engagement rate a *candidate* policy would have had, from logs of another one.

Each logged decision ``i`` has a context ``x_i`` (the member), the action taken ``a_i`` (channel and send
hour), the probability ``μ_i = μ(a_i | x_i)`` with which the logging policy took it (the propensity, stored
in the outbox), and the reward ``r_i`` (1 when the message engaged). For a candidate policy ``π`` the
importance weight is ``w_i = π(a_i | x_i) / μ_i``. The estimators of ``V(π) = E_x E_{a~π}[r]``:

* **IPS** (inverse propensity scoring, Horvitz-Thompson): ``V = mean(w_i r_i)``; unbiased whenever
  ``μ > 0`` wherever ``π > 0`` (the logging policy explored every action the candidate would take).
* **SNIPS** (self-normalised): ``V = Σ w_i r_i / Σ w_i``; slightly biased (O(1/n)), usually much lower
  variance, always inside the range of the rewards.
* **DR** (doubly robust, Dudík, Langford and Li 2011): with an outcome model ``q(x, a)``,
  ``V = mean(q_π(x_i) + w_i (r_i − q(x_i, a_i)))`` where ``q_π(x) = Σ_a π(a|x) q(x, a)``. Unbiased if the
  propensities are right *or* the model is; a good model removes most of IPS's variance.

Intervals. The default is the normal interval from the variance formula (``se`` = the standard deviation of
the per-row terms over ``√n``; for SNIPS the delta method ``√Σ w_i²(r_i − V)² / Σ w_i``). Rows of one
member across several runs are not independent: pass ``cluster`` (the member id) and the terms are summed
per cluster first (cluster-robust ``se``). :func:`bootstrap` gives percentile intervals by resampling
clusters instead. ``effective_n = (Σw)² / Σw²`` says how many logged rows the estimate is really worth:
a candidate far from the logging policy has a small effective n and a wide interval.

Everything takes per-row arrays, so the caller decides what the actions are; :func:`deterministic` turns a
candidate that picks one action per context into ``π(a_i|x_i)`` and ``q_π``, and :func:`cell_means` fits a
simple outcome model (shrunken rates per context cell and action) for DR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import norm

ESTIMATORS = ("ips", "snips", "dr")


@dataclass(frozen=True)
class Estimate:
    """One estimate of a policy's value with its interval."""

    estimator: str
    value: float
    se: float
    ci: tuple[float, float]
    n: int  # logged rows
    effective_n: float  # (Σw)² / Σw²: the rows' worth for this candidate
    matched: int  # rows where the candidate would have taken the logged action (π > 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arrays(reward: npt.ArrayLike, propensity: npt.ArrayLike, target: npt.ArrayLike
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(reward, dtype=float)
    mu = np.asarray(propensity, dtype=float)
    pi = np.asarray(target, dtype=float)
    if not (r.shape == mu.shape == pi.shape) or r.ndim != 1:
        raise ValueError("reward, propensity and target probability must be 1-D arrays of one length")
    if r.size == 0:
        raise ValueError("no logged rows")
    if np.any(~np.isfinite(mu)) or np.any(mu <= 0) or np.any(mu > 1):
        raise ValueError("propensities must be in (0, 1]: a logged action had probability 0 or none was logged")
    if np.any(pi < 0) or np.any(pi > 1):
        raise ValueError("target probabilities must be in [0, 1]")
    return r, mu, pi


def _se(terms: np.ndarray, cluster: npt.ArrayLike | None) -> float:
    """Standard error of ``mean(terms)``; cluster-robust when ``cluster`` is given."""
    n = terms.size
    if cluster is None:
        return float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    _, codes = np.unique(np.asarray(cluster), return_inverse=True)
    sums = np.bincount(codes, weights=terms - terms.mean())
    g = sums.size
    if g < 2:
        return float("nan")
    return float(np.sqrt(g / (g - 1) * np.sum(sums ** 2)) / n)


def _estimate(name: str, value: float, se: float, w: np.ndarray, pi: np.ndarray, level: float) -> Estimate:
    z = float(norm.ppf(0.5 + level / 2))
    sw, sw2 = float(w.sum()), float((w ** 2).sum())
    return Estimate(name, float(value), se, (float(value - z * se), float(value + z * se)), int(w.size),
                    sw * sw / sw2 if sw2 > 0 else 0.0, int(np.count_nonzero(pi)))


def ips(reward: npt.ArrayLike, propensity: npt.ArrayLike, target: npt.ArrayLike, *,
        cluster: npt.ArrayLike | None = None, level: float = 0.95) -> Estimate:
    """Inverse propensity scoring: ``mean(w r)`` with ``w = π(a|x)/μ(a|x)``."""
    r, mu, pi = _arrays(reward, propensity, target)
    w = pi / mu
    terms = w * r
    return _estimate("ips", float(terms.mean()), _se(terms, cluster), w, pi, level)


def snips(reward: npt.ArrayLike, propensity: npt.ArrayLike, target: npt.ArrayLike, *,
          cluster: npt.ArrayLike | None = None, level: float = 0.95) -> Estimate:
    """Self-normalised IPS: ``Σ w r / Σ w``; delta-method standard error."""
    r, mu, pi = _arrays(reward, propensity, target)
    w = pi / mu
    sw = w.sum()
    if sw <= 0:
        return Estimate("snips", float("nan"), float("nan"), (float("nan"), float("nan")), int(r.size), 0.0, 0)
    v = float((w * r).sum() / sw)
    # The ratio's linearisation: terms w (r - V) / mean(w), whose mean is 0.
    lin = w * (r - v) / w.mean()
    return _estimate("snips", v, _se(lin, cluster), w, pi, level)


def doubly_robust(reward: npt.ArrayLike, propensity: npt.ArrayLike, target: npt.ArrayLike,
                  q_logged: npt.ArrayLike, q_target: npt.ArrayLike, *, cluster: npt.ArrayLike | None = None,
                  level: float = 0.95) -> Estimate:
    """Doubly robust: ``mean(q_π(x) + w (r − q(x, a)))``.

    ``q_logged[i] = q(x_i, a_i)`` is the outcome model at the logged action, ``q_target[i] = Σ_a π(a|x_i) q(x_i, a)``
    its expectation under the candidate.
    """
    r, mu, pi = _arrays(reward, propensity, target)
    ql = np.asarray(q_logged, dtype=float)
    qt = np.asarray(q_target, dtype=float)
    if ql.shape != r.shape or qt.shape != r.shape:
        raise ValueError("q_logged and q_target must have one value per logged row")
    w = pi / mu
    terms = qt + w * (r - ql)
    return _estimate("dr", float(terms.mean()), _se(terms, cluster), w, pi, level)


def evaluate(reward: npt.ArrayLike, propensity: npt.ArrayLike, target: npt.ArrayLike, *,
             q_logged: npt.ArrayLike | None = None, q_target: npt.ArrayLike | None = None,
             cluster: npt.ArrayLike | None = None, level: float = 0.95) -> dict[str, Estimate]:
    """IPS, SNIPS and (when an outcome model is given) DR estimates of one candidate."""
    out = {"ips": ips(reward, propensity, target, cluster=cluster, level=level),
           "snips": snips(reward, propensity, target, cluster=cluster, level=level)}
    if q_logged is not None and q_target is not None:
        out["dr"] = doubly_robust(reward, propensity, target, q_logged, q_target, cluster=cluster, level=level)
    return out


def bootstrap(estimator: Callable[[np.ndarray], float], n_rows: int, *, cluster: npt.ArrayLike | None = None,
              n_boot: int = 500, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``estimator(rows)`` (``rows``: indices into the logged arrays), resampling
    whole clusters (members) when ``cluster`` is given, rows otherwise."""
    rng = np.random.default_rng(seed)
    if cluster is None:
        groups = [np.array([i]) for i in range(n_rows)]
    else:
        _, codes = np.unique(np.asarray(cluster), return_inverse=True)
        order = np.argsort(codes, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        stats[b] = estimator(np.concatenate([groups[i] for i in pick]))
    lo, hi = np.quantile(stats, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def deterministic(logged_action: npt.ArrayLike, target_action: npt.ArrayLike,
                  q: np.ndarray | None = None, context: npt.ArrayLike | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """For a candidate that takes ``target_action[i]`` in row ``i``'s context: ``π(a_i|x_i)`` (1 when the logged
    action is the candidate's, else 0) and, with an outcome table ``q[context, action]``, ``q_logged`` and
    ``q_target`` for :func:`doubly_robust`."""
    la = np.asarray(logged_action, dtype=np.int64)
    ta = np.asarray(target_action, dtype=np.int64)
    pi = (la == ta).astype(float)
    if q is None or context is None:
        return pi, None, None
    cx = np.asarray(context, dtype=np.int64)
    return pi, q[cx, la], q[cx, ta]


def cell_means(context: npt.ArrayLike, action: npt.ArrayLike, reward: npt.ArrayLike, n_contexts: int,
               n_actions: int, *, weight: npt.ArrayLike | None = None, strength: float = 20.0) -> np.ndarray:
    """An outcome model ``q[context, action]``: the (optionally weighted) mean reward of each cell, shrunk toward
    the action's mean over all contexts with ``strength`` pseudo-rows (and that toward the overall mean)."""
    cx = np.asarray(context, dtype=np.int64)
    a = np.asarray(action, dtype=np.int64)
    r = np.asarray(reward, dtype=float)
    w = np.ones(r.size) if weight is None else np.asarray(weight, dtype=float)
    overall = float((w * r).sum() / w.sum()) if w.sum() > 0 else 0.0
    na = np.bincount(a, weights=w, minlength=n_actions)
    ra = (np.bincount(a, weights=w * r, minlength=n_actions) + strength * overall) / (na + strength)
    n = np.zeros((n_contexts, n_actions))
    s = np.zeros((n_contexts, n_actions))
    np.add.at(n, (cx, a), w)
    np.add.at(s, (cx, a), w * r)
    return (s + strength * ra[None, :]) / (n + strength)


__all__ = ["ESTIMATORS", "Estimate", "bootstrap", "cell_means", "deterministic", "doubly_robust", "evaluate", "ips",
           "snips"]
