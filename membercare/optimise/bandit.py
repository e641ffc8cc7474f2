"""Thompson-sampling allocation of template variants between runs of a recurring campaign.

Each variant's goal rate (click or conversion per message sent) has a Beta posterior,
``Beta(a0 + successes, b0 + sends - successes)`` with the uniform prior ``Beta(1, 1)`` by default.
Before a run the planner asks :func:`allocate` for the shares of the next run:

1. ``P(best)`` for every variant: the fraction of Monte-Carlo draws (one joint draw from all posteriors
   per iteration, seeded) in which that variant has the highest rate. Allocating in proportion to
   ``P(best)`` is batched Thompson sampling (probability matching): every member of the run gets an
   independent Thompson draw, in expectation.
2. An exploration floor: ``share = floor + (1 - K * floor) * P(best)``, so every variant keeps at least
   ``floor`` of the traffic (default 5 %) until a winner is promoted. The floor keeps estimates of
   the losers current, which matters when appeal drifts (seasonality, fatigue).
3. Promotion, with error control: the leader is promoted (and gets the whole traffic; the test is over) when the
   run-stratified always-valid test of :mod:`membercare.optimise.sequential` says it beats every other variant at
   family-wise level ``alpha = 1 - threshold`` (so the default ``threshold`` 0.95 bounds the false-winner rate of
   an A/A test by 5 % however many runs look at it) and every variant has at least ``min_sends`` sends.
   ``P(best)`` only sets the shares: checked after every run it is no stopping rule (it promoted a winner between
   identical variants in 39-54 % of A/A tests). Pass the per-run counts (``runs``) so drift of the base rate
   between runs cannot look like a difference; without them the pooled counts are one stratum. The evidence
   (stratified differences, always-valid intervals, likelihood ratios) is in the report's ``evidence``.
   A threshold of exactly 1.0 never promotes: use it with ``floor = 1/K`` for a fixed equal split.

Before any data all posteriors are equal and the shares are exactly uniform. The Monte-Carlo error of
``P(best)`` with the default 20,000 draws is at most 0.0035 (one standard error); the RNG is seeded from
the campaign and occurrence (:func:`seed_for`), so a re-planned run gets the same shares.

Pure numpy/scipy; the planner persists the shares it used, the report calls :func:`bandit_report`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from membercare.optimise import sequential

Goal = Literal["click", "conversion"]

DEFAULT_FLOOR = 0.05
DEFAULT_THRESHOLD = 0.95
DEFAULT_DRAWS = 20_000
DEFAULT_MIN_SENDS = 100


@dataclass(frozen=True)
class VariantStats:
    """Observed results of one variant so far (all runs of the campaign): messages sent and goal successes."""

    name: str
    sends: int
    successes: int

    def __post_init__(self):
        if self.sends < 0 or not (0 <= self.successes <= self.sends):
            raise ValueError(f"variant {self.name!r}: need 0 <= successes <= sends, got {self.successes}/{self.sends}")


@dataclass(frozen=True)
class VariantReport:
    name: str
    sends: int
    successes: int
    posterior_alpha: float
    posterior_beta: float
    posterior_mean: float
    credible_interval: tuple[float, float]  # equal-tailed 95 %
    p_best: float
    share: float  # share of the next run


@dataclass(frozen=True)
class BanditReport:
    goal: str
    variants: list[VariantReport]
    winner: str | None
    threshold: float
    floor: float
    draws: int
    seed: int | None
    notes: list[str] = field(default_factory=list)
    evidence: dict | None = None  # sequential.Evidence.to_dict(): why the winner was (or was not yet) promoted

    @property
    def shares(self) -> dict[str, float]:
        return {v.name: v.share for v in self.variants}

    def to_dict(self) -> dict:
        return asdict(self)


def seed_for(campaign: str, occurrence: str) -> int:
    """A reproducible RNG seed for one run of a campaign."""
    digest = hashlib.sha256(f"bandit\x1f{campaign}\x1f{occurrence}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def posteriors(stats_: Sequence[VariantStats],
               prior: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    a0, b0 = prior
    if a0 <= 0 or b0 <= 0:
        raise ValueError("Beta prior parameters must be positive")
    s = np.array([v.successes for v in stats_], dtype=float)
    n = np.array([v.sends for v in stats_], dtype=float)
    return a0 + s, b0 + n - s


def probability_best(alpha: np.ndarray, beta: np.ndarray, *, draws: int = DEFAULT_DRAWS,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """Monte-Carlo ``P(variant k has the highest rate)`` under independent Beta posteriors.

    Exactly ``1/K`` each when all posteriors are identical (no Monte-Carlo noise before any data).
    Memory is ``draws x K`` floats, processed in chunks.
    """
    alpha, beta = np.asarray(alpha, float), np.asarray(beta, float)
    k = alpha.size
    if k == 0:
        raise ValueError("no variants")
    if k == 1:
        return np.ones(1)
    if np.all(alpha == alpha[0]) and np.all(beta == beta[0]):
        return np.full(k, 1.0 / k)
    rng = rng if rng is not None else np.random.default_rng()
    wins = np.zeros(k)
    chunk = max(1, 2_000_000 // k)
    left = draws
    while left > 0:
        m = min(chunk, left)
        theta = rng.beta(alpha, beta, size=(m, k))
        wins += np.bincount(theta.argmax(axis=1), minlength=k)
        left -= m
    return wins / draws


def shares_with_floor(p_best: np.ndarray, floor: float) -> np.ndarray:
    k = p_best.size
    if not 0.0 <= floor <= 1.0 / k:
        raise ValueError(f"floor {floor} is impossible with {k} variants (max {1.0 / k:.4f})")
    return floor + (1.0 - k * floor) * p_best


def allocate(
    variants: Sequence[VariantStats],
    *,
    goal: Goal = "click",
    floor: float = DEFAULT_FLOOR,
    threshold: float = DEFAULT_THRESHOLD,
    min_sends: int = DEFAULT_MIN_SENDS,
    draws: int = DEFAULT_DRAWS,
    prior: tuple[float, float] = (1.0, 1.0),
    seed: int | None = None,
    confidence: float = 0.95,
    runs: Sequence[Sequence[VariantStats]] | None = None,
    lift: float = sequential.DEFAULT_LIFT,
) -> BanditReport:
    """Shares for the next run, the promoted winner (if any) and each variant's posterior.

    ``variants`` holds cumulative results on ``goal`` (the caller counts clicks or conversions). Names
    must be unique. With a winner, its share is 1 and the others' 0. ``runs`` holds the same counts per earlier
    run (each a list in the order of ``variants``) for the stratified promotion test; ``lift`` is the relative
    difference the test is tuned to (:func:`membercare.optimise.sequential.mixture_scale`).
    """
    if not variants:
        raise ValueError("at least one variant is required")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variant names: {names}")
    if not 0.5 < threshold <= 1.0:
        raise ValueError("threshold must be in (0.5, 1]")
    rng = np.random.default_rng(seed)
    alpha, beta = posteriors(variants, prior)
    p_best = probability_best(alpha, beta, draws=draws, rng=rng)
    notes: list[str] = []
    winner = None
    evidence = None
    if len(variants) == 1:
        winner = names[0]
    elif threshold < 1.0:  # 1.0: never promote (a fixed split)
        ev = sequential.evidence(names, *_run_matrix(variants, runs), alpha=1.0 - threshold, lift=lift)
        evidence = ev.to_dict()
        enough = all(v.sends >= min_sends for v in variants)
        if ev.winner is not None and enough:
            winner = ev.winner
        elif ev.winner is not None:
            notes.append(f"{ev.winner} passes the sequential test but some variant has < {min_sends} sends")
        elif not enough:
            notes.append(f"no promotion before every variant has {min_sends} sends")
    if winner is not None:
        shares = np.array([1.0 if n == winner else 0.0 for n in names])
    else:
        shares = shares_with_floor(p_best, floor)
    tail = (1.0 - confidence) / 2.0
    from scipy import stats  # imported here: scipy.stats costs ~2 s at import; only variant campaigns get here

    lo = stats.beta.ppf(tail, alpha, beta)
    hi = stats.beta.ppf(1.0 - tail, alpha, beta)
    reports = [
        VariantReport(
            name=v.name, sends=v.sends, successes=v.successes,
            posterior_alpha=float(alpha[i]), posterior_beta=float(beta[i]),
            posterior_mean=float(alpha[i] / (alpha[i] + beta[i])),
            credible_interval=(float(lo[i]), float(hi[i])),
            p_best=float(p_best[i]), share=float(shares[i]),
        )
        for i, v in enumerate(variants)
    ]
    return BanditReport(goal=goal, variants=reports, winner=winner, threshold=threshold, floor=floor,
                        draws=draws, seed=seed, notes=notes, evidence=evidence)


def _run_matrix(variants: Sequence[VariantStats],
                runs: Sequence[Sequence[VariantStats]] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(sends, successes)`` of shape ``(runs, K)``; the pooled counts as one run when ``runs`` is None."""
    if runs is None or not runs:
        runs = [variants]
    names = [v.name for v in variants]
    for r in runs:
        if [v.name for v in r] != names:
            raise ValueError(f"per-run counts must list the variants {names} in this order")
    sends = np.array([[v.sends for v in r] for r in runs], dtype=float)
    successes = np.array([[v.successes for v in r] for r in runs], dtype=float)
    return sends, successes


def uniform_shares(names: Sequence[str]) -> dict[str, float]:
    """The first run's allocation (no data yet)."""
    if not names:
        raise ValueError("at least one variant is required")
    return {n: 1.0 / len(names) for n in names}


def stats_from_mapping(counts: Mapping[str, tuple[int, int]]) -> list[VariantStats]:
    """``{"A": (sends, successes), ...}`` -> :class:`VariantStats` list (name order)."""
    return [VariantStats(name, int(n), int(s)) for name, (n, s) in sorted(counts.items())]
