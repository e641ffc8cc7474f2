"""Causal send-time and channel learning: randomise a small share of decisions, log their probability, learn
from what the message *did* at the hour and on the channel it was sent.

Why. Learning a member's best hour from the hours at which they opened or bought (:mod:`send_time`) reads the
shop's own schedule back: members who are always sent at 10:00 open at 10:00. And channel rates per group
computed from preference routing compare members who chose email with members who chose SMS. Neither tells
what *sending* at another hour or on another channel would do.

Exploration (:func:`explore`, :func:`explore_one`). With probability ``ε`` (the exploration rate, default
:data:`DEFAULT_EXPLORATION` = 10 %) a decision is drawn uniformly from the eligible options (channels the
member consented to and can be reached on; whole hours outside quiet hours), otherwise it is the current best
(greedy) option. The probability of the option taken, ``ε/K + (1 − ε)·[option = greedy]`` for ``K`` options,
is the *propensity*; the planner stores it in the outbox with the policy name (``policy``,
``channel_propensity``, ``send_hour``, ``hour_propensity``), so that any other policy can be evaluated from the
logs later (:mod:`offpolicy`). Draws are seeded per (campaign, occurrence, member): a re-plan repeats them.
:func:`thompson_probabilities` gives the propensity of a Thompson-sampling choice (no ε) by integrating over
the Beta posteriors.

Learning (:func:`option_rates`, :func:`best_options`). From logged messages (group, option, engaged 0/1,
propensity): per group and option the inverse-propensity weighted (Hájek) engagement rate
``Σ r_i/μ_i / Σ 1/μ_i``, which estimates the rate the group would have if *every* message went out with that
option, whatever the logging policy favoured. For hours the numerator and denominator are smoothed over
neighbouring hours (circular Gaussian kernel, σ = 1.5 h) and shrunk toward the population's curve with
``strength`` weighted messages (and that toward the overall rate). The estimator sees only the send hour and
the outcome of each message, never the hour the member happened to engage, so a shop's old schedule cannot be
relearned as "best": an hour that was never sent has no evidence and keeps the population's rate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from membercare.optimise.send_time import DEFAULT_BANDWIDTH, HOURS, AllowedHours, kernel_matrix

DEFAULT_EXPLORATION = 0.10
DEFAULT_STRENGTH = 50.0
POLICY_VERSION = 1

T = TypeVar("T")


def propensity(epsilon: float, n_options: int, is_greedy: npt.ArrayLike) -> np.ndarray:
    """``ε/K + (1 − ε)·[option = greedy]``: the probability of the option taken under ε-greedy."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError("the exploration rate must be in [0, 1]")
    k = np.asarray(n_options, dtype=float)
    return epsilon / k + (1.0 - epsilon) * np.asarray(is_greedy, dtype=float)


def explore_one(greedy: T, options: Sequence[T], epsilon: float, rng: random.Random) -> tuple[T, float]:
    """One ε-greedy decision: ``(option, its propensity)``. ``greedy`` must be one of ``options``."""
    if not options:
        raise ValueError("no options to choose from")
    if greedy not in options:
        raise ValueError("the greedy option must be one of the options")
    chosen = options[rng.randrange(len(options))] if rng.random() < epsilon else greedy
    return chosen, float(propensity(epsilon, len(options), chosen == greedy))


@dataclass(frozen=True)
class Explored:
    choice: np.ndarray  # option index per row (-1 when a row has no eligible option)
    propensity: np.ndarray  # probability of the option taken (nan when none)
    explored: np.ndarray  # rows whose choice was drawn at random (it may still equal the greedy option)


def explore(greedy: npt.ArrayLike, eligible: np.ndarray, epsilon: float, rng: np.random.Generator) -> Explored:
    """Vectorised ε-greedy over ``(rows, options)``: ``greedy[i]`` (an eligible option) with probability ``1 − ε``,
    else a uniformly random eligible option of row ``i``."""
    el = np.asarray(eligible, dtype=bool)
    g = np.asarray(greedy, dtype=np.int64)
    rows = np.arange(el.shape[0])
    none = ~el.any(axis=1)
    if np.any(~none & ~el[rows, np.clip(g, 0, el.shape[1] - 1)]):
        raise ValueError("the greedy option must be eligible")
    drawn = rng.random(el.shape[0]) < epsilon
    keys = np.where(el, rng.random(el.shape), -1.0)
    choice = np.where(drawn, keys.argmax(axis=1), g)
    p = propensity(epsilon, np.maximum(el.sum(axis=1), 1), choice == g)
    return Explored(np.where(none, -1, choice), np.where(none, np.nan, p), np.asarray(drawn & ~none))


_GRIDS: dict[int, np.ndarray] = {}


def _grid(n: int) -> np.ndarray:
    g = _GRIDS.get(n)
    if g is None:
        g = _GRIDS[n] = (np.arange(n)[None, :] + 0.5) / n
    return g


def thompson_probabilities(alpha: Sequence[float], beta: Sequence[float], *, grid: int = 400) -> np.ndarray:
    """P(option k has the highest draw) for independent ``Beta(alpha_k, beta_k)`` draws, by numerical
    integration of ``f_k(x) Π_{j≠k} F_j(x)`` on a grid (within 0.005 of Monte Carlo in the tests)."""
    a = np.asarray(alpha, dtype=float)[:, None]
    b = np.asarray(beta, dtype=float)[:, None]
    if a.shape[0] == 1:
        return np.ones(1)
    # A grid over where the posteriors have their mass (mean ± 8 sd), linear when that stays above 0, else in
    # log x down to 1e-12 (a density with alpha < 1 is singular at 0; in log x it is not). Each density is
    # normalised on the grid and its CDF is the running sum: no incomplete-beta calls, since the planner calls this
    # once per member.
    mean = a / (a + b)
    sd = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))
    lo, hi = float((mean - 8 * sd).min()), min(float((mean + 8 * sd).max()), 1.0 - 1e-12)
    if lo > 0:
        x = lo + (hi - lo) * _grid(grid)
        logpdf = (a - 1.0) * np.log(x) + (b - 1.0) * np.log1p(-x)
    else:
        t = np.log(1e-12) + (np.log(hi) - np.log(1e-12)) * _grid(2 * grid)
        x = np.exp(t)
        logpdf = a * t + (b - 1.0) * np.log1p(-x)  # density in log x: f(x)·x
    pdf = np.exp(logpdf - logpdf.max(axis=1, keepdims=True))
    pdf /= pdf.sum(axis=1, keepdims=True)
    cdf = np.cumsum(pdf, axis=1) - 0.5 * pdf
    logc = np.log(np.clip(cdf, 1e-300, None))
    others = np.exp(logc.sum(axis=0, keepdims=True) - logc)
    p = (pdf * others).sum(axis=1)
    p = np.clip(p, 0.0, None)
    return p / p.sum() if p.sum() > 0 else np.full(a.shape[0], 1.0 / a.shape[0])


@dataclass(frozen=True)
class OptionRates:
    """Inverse-propensity weighted engagement rate per group and option (see the module docstring)."""

    rate: np.ndarray  # (groups, options), shrunk
    weight: np.ndarray  # (groups, options): Σ 1/μ (after smoothing for hours): the evidence behind each rate
    messages: np.ndarray  # (groups, options): logged messages
    population: np.ndarray  # (options,): the population's rate, the shrinkage target


def option_rates(group: npt.ArrayLike, option: npt.ArrayLike, engaged: npt.ArrayLike, propensity: npt.ArrayLike,
                 n_groups: int, n_options: int, *, strength: float = DEFAULT_STRENGTH,
                 smooth: np.ndarray | None = None) -> OptionRates:
    """Hájek (self-normalised inverse-propensity) rate per group and option, optionally smoothed over options
    with ``smooth`` (an ``(options, options)`` matrix, e.g. :func:`send_time.kernel_matrix` for hours), and
    shrunk toward the population with ``strength`` weighted messages."""
    g = np.asarray(group, dtype=np.int64)
    o = np.asarray(option, dtype=np.int64)
    r = np.asarray(engaged, dtype=float)
    mu = np.asarray(propensity, dtype=float)
    if not (g.shape == o.shape == r.shape == mu.shape):
        raise ValueError("group, option, engaged and propensity must have one value per message")
    if np.any(~np.isfinite(mu)) or np.any(mu <= 0) or np.any(mu > 1):
        raise ValueError("propensities must be in (0, 1]")
    w = 1.0 / mu
    W = np.zeros((n_groups, n_options))
    S = np.zeros((n_groups, n_options))
    M = np.zeros((n_groups, n_options))
    np.add.at(W, (g, o), w)
    np.add.at(S, (g, o), w * r)
    np.add.at(M, (g, o), 1.0)
    return rates_from_sums(W, S, M, strength=strength, smooth=smooth)


def rates_from_sums(W: np.ndarray, S: np.ndarray, M: np.ndarray, *, strength: float = DEFAULT_STRENGTH,
                    smooth: np.ndarray | None = None) -> OptionRates:
    """:func:`option_rates` from sums per group and option (e.g. a SQL ``GROUP BY``): ``W = Σ 1/μ``,
    ``S = Σ r/μ``, ``M`` = messages."""
    W, S = np.asarray(W, dtype=float), np.asarray(S, dtype=float)
    if smooth is not None:
        W, S = W @ smooth.T, S @ smooth.T
    overall = float(S.sum() / W.sum()) if W.sum() > 0 else 0.0
    pw, ps = W.sum(axis=0), S.sum(axis=0)
    pop = (ps + strength * overall) / (pw + strength)
    rate = (S + strength * pop[None, :]) / (W + strength)
    return OptionRates(rate, W, M, pop)


def hour_rates(group: npt.ArrayLike, send_hour: npt.ArrayLike, engaged: npt.ArrayLike, propensity: npt.ArrayLike,
               n_groups: int, *, strength: float = DEFAULT_STRENGTH,
               bandwidth: float = DEFAULT_BANDWIDTH) -> OptionRates:
    """:func:`option_rates` over the 24 local send hours, smoothed over neighbouring hours."""
    return option_rates(group, send_hour, engaged, propensity, n_groups, HOURS, strength=strength,
                        smooth=kernel_matrix(bandwidth))


def best_options(rates: OptionRates, eligible: np.ndarray | None = None, *, default: int | None = None,
                 min_weight: float = 0.0) -> np.ndarray:
    """The option with the highest estimated rate per group (among ``eligible[g]`` options); groups whose
    evidence (total weight) is below ``min_weight`` get ``default`` (when given)."""
    score = rates.rate if eligible is None else np.where(eligible, rates.rate, -np.inf)
    best = score.argmax(axis=1)
    if default is not None:
        best = np.where(rates.weight.sum(axis=1) >= min_weight, best, default)
    return best.astype(np.int64)


DEFAULT_ALLOWED = AllowedHours()


def best_hours(rates: OptionRates, allowed: AllowedHours = DEFAULT_ALLOWED, *, default_hour: int | None = None,
               min_weight: float = 0.0) -> np.ndarray:
    """The best allowed send hour per group from :func:`hour_rates` (``default_hour`` without evidence)."""
    mask = np.broadcast_to(allowed.mask(), rates.rate.shape)
    default = allowed.clamp(default_hour) if default_hour is not None else None
    return best_options(rates, mask, default=default, min_weight=min_weight)


def policy_name(strategy: str, epsilon: float) -> str:
    """The label a hook stores with each decision, e.g. ``causal_hour/explore=0.1/v1``."""
    return f"{strategy}/explore={epsilon:g}/v{POLICY_VERSION}"


__all__ = ["DEFAULT_ALLOWED", "DEFAULT_EXPLORATION", "Explored", "OptionRates", "best_hours", "best_options",
           "explore", "explore_one", "hour_rates", "option_rates", "policy_name", "propensity", "rates_from_sums",
           "thompson_probabilities"]
