"""Always-valid promotion of a variant winner: a run-stratified mixture sequential test (mSPRT).

Why not "P(best) >= 95 % after every run": a posterior probability checked after every run with no error control
promotes a winner between two identical variants in 39-54 % of A/A tests (issue 17), and pooling counts across runs
while the shares change lets a drifting base rate masquerade as a difference. This module decides promotion instead
with a test whose false-winner rate is bounded however often it is looked at:

1. **Stratified per run.** For a pair of variants ``(i, j)`` each run ``r`` in which both were sent gives the
   difference of rates ``d_r = x_ir/n_ir - x_jr/n_jr`` with the pooled null variance
   ``v_r = p_r (1 - p_r) (1/n_ir + 1/n_jr)`` (``p_r`` the pair's rate in that run, with a 0.5/1 continuity pad so
   a run without successes has a finite weight). The runs are combined by inverse variance (Cochran-Mantel-Haenszel
   style): ``D = sum(d_r / v_r) / sum(1 / v_r)``, ``V = 1 / sum(1 / v_r)``. Only comparisons within a run enter,
   so a base rate that moves between runs cannot create a difference.
2. **Mixture likelihood ratio.** With a normal mixing distribution ``N(0, tau^2)`` over the true difference, the
   likelihood ratio of "difference" against "no difference" is
   ``Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 D^2 / (2 V (V + tau^2)))``, a (approximately Gaussian)
   martingale under the null; by Ville's inequality ``P(Lambda ever >= 1/a) <= a`` (Johari, Pekelis, Walsh 2017).
   ``tau`` is ``lift`` (default 25 %) times the overall success rate: the size of relative difference the test is
   tuned to detect fastest.
3. **Winner.** A variant is the winner when it beats every other variant (``D > 0`` and the pair's ``Lambda``
   past ``1/a``). Each pair is tested at ``a = alpha`` for two variants and ``a = 2 alpha / K`` for ``K``:
   a false winner among identical variants must in particular beat the next variant in a fixed cyclic order, so
   the false-winner event lies in the union of ``K`` one-sided crossings, each of probability about ``a / 2``
   for exchangeable variants (half of the two-sided bound ``a``), in total about ``alpha``. This is less
   conservative than Bonferroni over all ``K(K-1)/2`` pairs; ``bench/aa_calibration.py`` measures the actual
   false-winner rate by simulation, with the bandit's adaptive shares and a drifting base rate
   (docs/optimisation.md section 3).

The always-valid confidence sequence of a pair's difference (the set of differences the test would not reject)
is ``D +/- sqrt(2 V (V + tau^2) / tau^2 * (log(1/a) + log((V + tau^2) / V) / 2))``; it is part of the evidence
recorded with a promotion.

Everything broadcasts over leading axes: ``sends`` and ``successes`` of shape ``(..., runs, K)`` (the bench runs
thousands of simulated tests at once through the same code).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_ALPHA = 0.05
DEFAULT_LIFT = 0.25


def pair_statistics(sends: np.ndarray, successes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-stratified difference ``D[..., i, j]`` (rate i minus rate j) and its variance ``V[..., i, j]``.

    ``V`` is ``inf`` for a pair never sent in the same run (no information), and on the diagonal.
    """
    n = np.asarray(sends, dtype=float)
    x = np.asarray(successes, dtype=float)
    if n.shape != x.shape or n.ndim < 2:
        raise ValueError("sends and successes need the same shape (..., runs, variants)")
    if np.any(x < 0) or np.any(x > n):
        raise ValueError("need 0 <= successes <= sends")
    ni, nj = n[..., :, :, None], n[..., :, None, :]
    xi, xj = x[..., :, :, None], x[..., :, None, :]
    both = (ni > 0) & (nj > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(both, xi / np.where(ni > 0, ni, 1) - xj / np.where(nj > 0, nj, 1), 0.0)
        pooled = (xi + xj + 0.5) / (ni + nj + 1.0)
        v = pooled * (1.0 - pooled) * (1.0 / np.where(ni > 0, ni, 1) + 1.0 / np.where(nj > 0, nj, 1))
        w = np.where(both, 1.0 / v, 0.0)
        wsum = w.sum(axis=-3)
        big_d = np.where(wsum > 0, (w * d).sum(axis=-3) / np.where(wsum > 0, wsum, 1), 0.0)
        big_v = np.where(wsum > 0, 1.0 / np.where(wsum > 0, wsum, 1), np.inf)
    k = n.shape[-1]
    big_v = np.where(np.eye(k, dtype=bool), np.inf, big_v)
    return big_d, big_v


def mixture_scale(sends: np.ndarray, successes: np.ndarray, lift: float = DEFAULT_LIFT) -> np.ndarray:
    """``tau`` per test: ``lift`` times the overall success rate (padded so it is never 0)."""
    n = np.asarray(sends, dtype=float).sum(axis=(-2, -1))
    x = np.asarray(successes, dtype=float).sum(axis=(-2, -1))
    return lift * (x + 0.5) / (n + 1.0)


def log_likelihood_ratio(d: np.ndarray, v: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """``log Lambda`` of the normal-mixture SPRT; 0 where ``v`` is infinite (no data)."""
    t2 = np.asarray(tau, dtype=float) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 0.5 * np.log(v / (v + t2)) + t2 * d ** 2 / (2.0 * v * (v + t2))
    return np.where(np.isfinite(v), out, 0.0)


def pair_alpha(alpha: float, k: int) -> float:
    """The level of each pairwise test: ``alpha`` for two variants, ``2 alpha / K`` for more (see above)."""
    return alpha if k <= 2 else 2.0 * alpha / k


def winners(sends: np.ndarray, successes: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
            lift: float = DEFAULT_LIFT) -> np.ndarray:
    """Index of the variant that beats every other one (``-1`` for none), per leading index."""
    sends, successes = np.asarray(sends, dtype=float), np.asarray(successes, dtype=float)
    k = sends.shape[-1]
    d, v = pair_statistics(sends, successes)
    tau = mixture_scale(sends, successes, lift)[..., None, None]
    llr = log_likelihood_ratio(d, v, tau)
    beats = (d > 0) & (llr >= np.log(1.0 / pair_alpha(alpha, k)))
    beats_all = beats.sum(axis=-1) == k - 1
    return np.where(beats_all.any(axis=-1), beats_all.argmax(axis=-1), -1)


@dataclass(frozen=True)
class PairEvidence:
    """The test of ``better`` against ``other``: stratified difference, always-valid interval, likelihood ratio."""

    better: str
    other: str
    difference: float
    interval: tuple[float, float]
    log_likelihood_ratio: float
    bound: float  # log(1 / pair alpha): the pair crosses when log_likelihood_ratio >= bound


@dataclass(frozen=True)
class Evidence:
    """Why a variant was (or was not yet) promoted: the evidence stored with the allocation."""

    rule: str
    alpha: float
    lift: float
    runs: int
    tau: float
    leader: str
    pairs: list[PairEvidence]
    winner: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def evidence(names: list[str], sends: np.ndarray, successes: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
             lift: float = DEFAULT_LIFT) -> Evidence:
    """The test for one campaign (``sends``/``successes`` of shape ``(runs, K)``): the leader (highest
    stratified difference against the others) against every other variant."""
    sends, successes = np.asarray(sends, dtype=float), np.asarray(successes, dtype=float)
    if sends.ndim != 2 or sends.shape[1] != len(names):
        raise ValueError("sends must have shape (runs, number of variants)")
    k = len(names)
    d, v = pair_statistics(sends, successes)
    tau = float(mixture_scale(sends, successes, lift))
    llr = log_likelihood_ratio(d, v, np.asarray(tau))
    a = pair_alpha(alpha, k)
    bound = float(np.log(1.0 / a))
    lead = int(np.argmax(np.where(np.eye(k, dtype=bool), 0.0, d).sum(axis=1)))
    pairs = []
    for j in range(k):
        if j == lead:
            continue
        vij, dij, t2 = float(v[lead, j]), float(d[lead, j]), tau ** 2
        if np.isfinite(vij):
            radius = float(np.sqrt(2.0 * vij * (vij + t2) / t2 * (np.log(1.0 / a) + 0.5 * np.log((vij + t2) / vij))))
            interval = (dij - radius, dij + radius)
        else:
            interval = (-1.0, 1.0)
        pairs.append(PairEvidence(names[lead], names[j], dij, interval, float(llr[lead, j]), bound))
    won = int(winners(sends, successes, alpha=alpha, lift=lift)) if k > 1 else 0
    return Evidence(rule="run-stratified mixture SPRT, pairs at 2 alpha / K", alpha=alpha, lift=lift,
                    runs=int(sends.shape[0]), tau=tau, leader=names[lead], pairs=pairs,
                    winner=names[won] if won >= 0 else None)


__all__ = ["DEFAULT_ALPHA", "DEFAULT_LIFT", "Evidence", "PairEvidence", "evidence", "log_likelihood_ratio",
           "mixture_scale", "pair_alpha", "pair_statistics", "winners"]
