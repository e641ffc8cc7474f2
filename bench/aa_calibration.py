"""A/A calibration of variant-winner promotion (issue 17): how often is a winner promoted between identical variants?

Each simulated test is a recurring campaign with ``K`` variants run ``R`` times with ``N`` sends per run. Before
each run the shares come from the bandit (batched Thompson sampling on the pooled Beta posteriors with the 5 %
floor, as :func:`membercare.optimise.bandit.allocate`), sends are split multinomially, successes are binomial
with the run's true rate; after each run the promotion rule of :mod:`membercare.optimise.sequential` is checked
(every run is a look) and a promoted winner ends the test. The estimator sees only the counts: the true rates
(the planted truth) are used to draw outcomes and to score the result, never passed to the rule.

The base rate drifts between runs (a seasonal swing of +/-40 % around ``--rate``), so a rule that pooled counts
while the shares change would see differences that are only drift.

* ``false_winner_rate``: share of A/A tests (all variants equal) with any promoted winner; target <= 5 %.
* ``power``: share of tests with one planted better variant (``--lift`` relative, default +20 %) in which that
  variant is promoted by the last run; ``wrong_winner`` the share promoting another one. ``planted`` uses the
  bandit's shares (5 % floor: the test learns slowly about the variants it starves), ``planted_equal_split`` a
  fixed equal split (``floor = 1/K``), the most informative allocation for finding the winner.

Prints JSON (one entry per configuration: 2 and 3 variants x 20 and 52 runs x 1,000 and 5,000 sends per run) with
each rate's binomial standard error.

    .venv/bin/python bench/aa_calibration.py [--sims 2000] [--seed 17] [--rate 0.03] [--lift 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from membercare.optimise import bandit, sequential

THOMPSON_DRAWS = 400  # per simulated test and run: only the shares depend on it, not the error control


@dataclass(frozen=True)
class Outcome:
    variants: int
    runs: int
    sends_per_run: int
    sims: int
    planted_lift: float
    promoted: float  # share of tests with any winner
    right: float  # share promoting the planted winner (0 for A/A)
    stderr: float  # binomial standard error of ``promoted``
    mean_run_of_promotion: float | None


def drift(runs: int, rate: float) -> np.ndarray:
    """The true base rate of each run: a seasonal swing of +/-40 % (one cycle over 26 runs)."""
    return rate * (1.0 + 0.4 * np.sin(2.0 * np.pi * np.arange(runs) / 26.0))


def thompson_shares(sends: np.ndarray, successes: np.ndarray, rng: np.random.Generator,
                    floor: float = bandit.DEFAULT_FLOOR) -> np.ndarray:
    """Shares of the next run for many tests at once (pooled Beta(1, 1) posteriors, floor)."""
    s, k = sends.shape[0], sends.shape[-1]
    a, b = 1.0 + successes, 1.0 + sends - successes
    theta = rng.beta(a[:, None, :], b[:, None, :], size=(s, THOMPSON_DRAWS, k))
    p_best = np.zeros((s, k))
    np.add.at(p_best, (np.repeat(np.arange(s), THOMPSON_DRAWS), theta.argmax(axis=-1).ravel()), 1.0)
    return floor + (1.0 - k * floor) * p_best / THOMPSON_DRAWS


def simulate(variants: int, runs: int, sends_per_run: int, *, sims: int, rate: float = 0.03,
             planted_lift: float = 0.0, seed: int = 17, alpha: float = sequential.DEFAULT_ALPHA,
             tau_lift: float = sequential.DEFAULT_LIFT, floor: float = bandit.DEFAULT_FLOOR) -> Outcome:
    """Run ``sims`` tests; with ``planted_lift > 0`` the last variant's rate is ``(1 + lift)`` times the others'."""
    rng = np.random.default_rng(seed)
    base = drift(runs, rate)
    multiplier = np.ones(variants)
    multiplier[-1] += planted_lift
    sends = np.zeros((sims, runs, variants))
    succ = np.zeros((sims, runs, variants))
    winner = np.full(sims, -1)
    when = np.full(sims, -1)
    for r in range(runs):
        live = winner < 0
        if not live.any():
            break
        idx = np.flatnonzero(live)
        shares = thompson_shares(sends[idx].sum(axis=1), succ[idx].sum(axis=1), rng, floor)
        n = np.stack([rng.multinomial(sends_per_run, p / p.sum()) for p in shares])
        sends[idx, r] = n
        succ[idx, r] = rng.binomial(n.astype(np.int64), base[r] * multiplier)
        won = sequential.winners(sends[idx, : r + 1], succ[idx, : r + 1], alpha=alpha, lift=tau_lift)
        new = won >= 0
        winner[idx[new]] = won[new]
        when[idx[new]] = r + 1
    promoted = float(np.mean(winner >= 0))
    right = float(np.mean(winner == variants - 1)) if planted_lift > 0 else 0.0
    return Outcome(variants=variants, runs=runs, sends_per_run=sends_per_run, sims=sims, planted_lift=planted_lift,
                   promoted=promoted, right=right, stderr=float(np.sqrt(max(promoted * (1 - promoted), 1e-12) / sims)),
                   mean_run_of_promotion=float(when[when > 0].mean()) if (when > 0).any() else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--rate", type=float, default=0.03)
    ap.add_argument("--lift", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=sequential.DEFAULT_ALPHA)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    out: dict[str, list[dict]] = {"aa": [], "planted": [], "planted_equal_split": []}
    for k in (2, 3):
        for runs in (20, 52):
            for n in (1000, 5000):
                seed = args.seed + 1000 * k + 10 * runs + n
                aa = simulate(k, runs, n, sims=args.sims, rate=args.rate, seed=seed, alpha=args.alpha)
                out["aa"].append({**asdict(aa), "false_winner_rate": aa.promoted})
                pw = simulate(k, runs, n, sims=args.sims, rate=args.rate, planted_lift=args.lift, seed=seed + 1,
                              alpha=args.alpha)
                out["planted"].append({**asdict(pw), "power": pw.right, "wrong_winner": pw.promoted - pw.right})
                eq = simulate(k, runs, n, sims=args.sims, rate=args.rate, planted_lift=args.lift, seed=seed + 2,
                              alpha=args.alpha, floor=1.0 / k)
                out["planted_equal_split"].append({**asdict(eq), "power": eq.right,
                                                   "wrong_winner": eq.promoted - eq.right})
    worst = max(r["false_winner_rate"] for r in out["aa"])
    print(json.dumps({"command": "bench/aa_calibration.py", "options": vars(args), "rule": "run-stratified mixture "
                      "SPRT (membercare.optimise.sequential), checked after every run",
                      "max_false_winner_rate": worst, "target": args.alpha,
                      "seconds": round(time.perf_counter() - started, 1), **out}, indent=2))
    return 0 if worst <= args.alpha else 1


if __name__ == "__main__":
    sys.exit(main())
