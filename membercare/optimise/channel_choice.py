"""Best channel per member (routing strategy ``best_engagement``).

Model. Member ``m`` engages with a message on channel ``c`` (opens/clicks it, for the campaign's goal)
with an unknown probability ``θ[m, c]``. Its prior is a Beta centred on the rate of *similar members*
(the member's group ``g``, e.g. age group x segment), with a prior strength ``κ`` in pseudo-messages::

    θ[m, c] ~ Beta(κ · r[g, c], κ · (1 - r[g, c]))
    posterior: Beta(κ · r[g, c] + e[m, c], κ · (1 - r[g, c]) + n[m, c] - e[m, c])

where ``n`` are messages sent and ``e`` engagements. This is empirical Bayes: ``r[g, c]`` is estimated
from the data itself (:func:`group_rates`), and is in turn shrunk toward the channel's overall rate with
``group_strength`` pseudo-messages, so a small group does not get an extreme prior. A member with no
history behaves like their group; after ``κ`` messages their own history weighs as much as the group's.
The default ``κ = 5`` lets a member's own history dominate after a handful of messages.
:func:`fit_prior_strength` estimates ``κ`` per channel by the method of moments; it assumes the number
of messages per member does not depend on past outcomes, so fit it on history from a non-adaptive
strategy (preference routing), not on data this module's own routing produced (adaptive routing
sends more to members who engaged, which biases the moment estimate toward a too-strong prior).

Choice (:func:`choose_channels`): among the channels a member consented to and can be reached on, pick
the argmax of one Thompson draw per channel (default), which explores in proportion to uncertainty and
stops exploring by itself as evidence accumulates; or epsilon-greedy (posterior mean, with probability
``epsilon`` a uniformly random eligible channel). Everything is vectorised over members:
``(members, channels)`` arrays, about 0.2 s for 100,000 members x 3 channels (mostly the Beta draws).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

DEFAULT_PRIOR_STRENGTH = 5.0
DEFAULT_GROUP_STRENGTH = 50.0
DEFAULT_EPSILON = 0.05
DEFAULT_PREFERENCE_WEIGHT = 0.5
NO_CHANNEL = -1


@dataclass(frozen=True)
class EngagementCounts:
    """Per member x channel message and engagement counts (two int arrays of shape ``(members, channels)``)."""

    sends: np.ndarray
    engagements: np.ndarray

    def __post_init__(self):
        if self.sends.shape != self.engagements.shape or self.sends.ndim != 2:
            raise ValueError("sends and engagements must be 2-D arrays of the same shape")
        if np.any(self.engagements < 0) or np.any(self.engagements > self.sends):
            raise ValueError("need 0 <= engagements <= sends")

    @classmethod
    def from_events(cls, n_members: int, n_channels: int, member_index: npt.ArrayLike, channel_index: npt.ArrayLike,
                    sends: npt.ArrayLike | None = None, engagements: npt.ArrayLike | None = None) -> EngagementCounts:
        """Aggregate long-form rows (e.g. one per message, or per member/channel from SQL) into the matrices.

        ``sends`` defaults to 1 per row; ``engagements`` to 0. Rows with repeated (member, channel) add up.
        """
        mi = np.asarray(member_index, dtype=np.int64)
        ci = np.asarray(channel_index, dtype=np.int64)
        s = np.ones(mi.size, np.int64) if sends is None else np.asarray(sends, np.int64)
        e = np.zeros(mi.size, np.int64) if engagements is None else np.asarray(engagements, np.int64)
        S = np.zeros((n_members, n_channels), np.int64)
        E = np.zeros((n_members, n_channels), np.int64)
        np.add.at(S, (mi, ci), s)
        np.add.at(E, (mi, ci), e)
        return cls(S, E)


def group_rates(counts: EngagementCounts, group: npt.ArrayLike, n_groups: int | None = None, *,
                group_strength: float = DEFAULT_GROUP_STRENGTH, base_rate: float = 0.05) -> np.ndarray:
    """Engagement rate per group x channel, shrunk toward each channel's overall rate.

    ``r[g, c] = (E[g, c] + s · R[c]) / (N[g, c] + s)`` where ``R[c]`` is the channel's pooled rate over all
    members (``base_rate`` for a channel with no sends at all) and ``s = group_strength``.
    """
    group = np.asarray(group, dtype=np.int64)
    if group.shape != (counts.sends.shape[0],):
        raise ValueError("group must have one entry per member")
    G = int(group.max()) + 1 if n_groups is None else int(n_groups)
    C = counts.sends.shape[1]
    N = np.zeros((G, C))
    E = np.zeros((G, C))
    np.add.at(N, group, counts.sends)
    np.add.at(E, group, counts.engagements)
    return rates_from_totals(N, E, group_strength=group_strength, base_rate=base_rate)


def rates_from_totals(sends: np.ndarray, engagements: np.ndarray, *, group_strength: float = DEFAULT_GROUP_STRENGTH,
                      base_rate: float = 0.05) -> np.ndarray:
    """:func:`group_rates` from per group x channel totals (e.g. a SQL ``GROUP BY`` of the history)."""
    N = np.asarray(sends, dtype=float)
    E = np.asarray(engagements, dtype=float)
    if N.shape != E.shape or N.ndim != 2:
        raise ValueError("sends and engagements must be 2-D arrays of the same shape")
    if np.any(E < 0) or np.any(E > N):
        raise ValueError("need 0 <= engagements <= sends")
    return (E + group_strength * overall_rates(N, E, base_rate=base_rate)) / (N + group_strength)


def overall_rates(sends: np.ndarray, engagements: np.ndarray, *, base_rate: float = 0.05) -> np.ndarray:
    """Each channel's pooled rate over all groups (``base_rate`` for a channel with no sends): the prior
    of a member whose group has no history at all."""
    tot_n = np.asarray(sends, dtype=float).sum(axis=0)
    tot_e = np.asarray(engagements, dtype=float).sum(axis=0)
    return np.where(tot_n > 0, tot_e / np.maximum(tot_n, 1), base_rate)


def fit_prior_strength(counts: EngagementCounts, group: npt.ArrayLike, rates: np.ndarray, *, min_sends: int = 2,
                       min_members: int = 50, bounds: tuple[float, float] = (1.0, 200.0),
                       default: float = DEFAULT_PRIOR_STRENGTH) -> np.ndarray:
    """Empirical-Bayes prior strength ``κ`` per channel, by the method of moments.

    Under the model, a member's observed rate ``y = e / n`` around their group rate ``r`` has
    ``E[(y - r)^2] = r(1-r)/n + τ²(1 - 1/n)`` with between-member variance ``τ² = r(1-r)/(κ+1)``. So
    ``τ² = mean((y - r)^2 - r(1-r)/n) / mean(1 - 1/n)`` over members with at least ``min_sends``
    sends on the channel, and ``κ = mean(r(1-r)) / τ² - 1``: members who differ a lot from their group
    give a weak prior (own history takes over quickly), homogeneous groups a strong one. Clipped to
    ``bounds``; ``default`` for a channel with fewer than ``min_members`` usable members; the upper
    bound when no heterogeneity is detectable.
    """
    g = np.asarray(group, dtype=np.int64)
    r = rates[g]
    n = counts.sends.astype(float)
    use = n >= min_sends
    out = np.full(n.shape[1], float(default))
    for c in range(n.shape[1]):
        u = use[:, c]
        if u.sum() < min_members:
            continue
        rc, nc = r[u, c], n[u, c]
        y = counts.engagements[u, c] / nc
        var_within = rc * (1 - rc)
        tau2 = float(np.mean((y - rc) ** 2 - var_within / nc) / np.mean(1.0 - 1.0 / nc))
        out[c] = bounds[1] if tau2 <= 0 else float(np.clip(var_within.mean() / tau2 - 1.0, *bounds))
    return out


def posterior_params(counts: EngagementCounts, group: npt.ArrayLike, rates: np.ndarray, *,
                     prior_strength: float | np.ndarray = DEFAULT_PRIOR_STRENGTH,
                     preferred: npt.ArrayLike | None = None, preference_weight: float = DEFAULT_PREFERENCE_WEIGHT,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Beta posterior ``(alpha, beta)`` per member x channel (see the module docstring).

    ``prior_strength`` is a number or one number per channel (e.g. from :func:`fit_prior_strength`).
    ``preferred`` (channel index per member, ``NO_CHANNEL`` for none) adds the member's stated
    preference as ``preference_weight`` pseudo-engagements on that channel: without history the member
    leans to the channel they asked for, and a few real messages override it.
    """
    prior_strength = np.asarray(prior_strength, dtype=float)
    if np.any(prior_strength <= 0):
        raise ValueError("prior_strength must be positive")
    r = np.clip(rates[np.asarray(group, dtype=np.int64)], 1e-6, 1 - 1e-6)
    alpha = prior_strength * r + counts.engagements
    beta = prior_strength * (1.0 - r) + (counts.sends - counts.engagements)
    if preferred is not None and preference_weight > 0:
        pref = np.asarray(preferred, dtype=np.int64)
        rows = np.flatnonzero(pref != NO_CHANNEL)
        alpha[rows, pref[rows]] += preference_weight
    return alpha, beta


@dataclass(frozen=True)
class ChannelChoice:
    channel: np.ndarray  # int per member: index into the channel list, NO_CHANNEL (-1) when none is eligible
    posterior_mean: np.ndarray  # posterior mean engagement of the chosen channel (nan when none)
    greedy: np.ndarray  # the channel with the highest posterior mean (what pure exploitation would pick)

    @property
    def explored(self) -> np.ndarray:
        """Members routed to a channel other than the greedy choice (exploration)."""
        return (self.channel != self.greedy) & (self.channel != NO_CHANNEL)


def choose_channels(
    alpha: np.ndarray,
    beta: np.ndarray,
    eligible: np.ndarray,
    *,
    rng: np.random.Generator,
    method: Literal["thompson", "epsilon"] = "thompson",
    epsilon: float = DEFAULT_EPSILON,
) -> ChannelChoice:
    """The channel most likely to engage, among eligible ones, with a little exploration.

    ``eligible[m, c]`` is True when the member consented to marketing on ``c`` and can be reached there
    (address, phone or active push token, not suppressed). Members with no eligible channel get
    ``NO_CHANNEL``; the planner records them as skipped.
    """
    eligible = np.asarray(eligible, dtype=bool)
    if alpha.shape != eligible.shape or beta.shape != eligible.shape:
        raise ValueError("alpha, beta and eligible must have the same (members, channels) shape")
    mean = alpha / (alpha + beta)
    none = ~eligible.any(axis=1)
    masked_mean = np.where(eligible, mean, -np.inf)
    greedy = masked_mean.argmax(axis=1)
    if method == "thompson":
        draw = rng.beta(alpha, beta)
        choice = np.where(eligible, draw, -np.inf).argmax(axis=1)
    elif method == "epsilon":
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        choice = greedy.copy()
        explore = rng.random(eligible.shape[0]) < epsilon
        # A uniformly random eligible channel: argmax of random keys over the eligible cells.
        keys = np.where(eligible, rng.random(eligible.shape), -1.0)
        choice[explore] = keys[explore].argmax(axis=1)
    else:
        raise ValueError(f"unknown method {method!r}; valid choices: thompson, epsilon")
    rows = np.arange(eligible.shape[0])
    chosen_mean = mean[rows, choice].astype(float)
    choice = np.where(none, NO_CHANNEL, choice)
    greedy = np.where(none, NO_CHANNEL, greedy)
    chosen_mean[none] = np.nan
    return ChannelChoice(channel=choice, posterior_mean=chosen_mean, greedy=greedy)


def best_engagement(
    counts: EngagementCounts,
    group: npt.ArrayLike,
    eligible: np.ndarray,
    *,
    rng: np.random.Generator,
    n_groups: int | None = None,
    prior_strength: float | Literal["auto"] = DEFAULT_PRIOR_STRENGTH,
    group_strength: float = DEFAULT_GROUP_STRENGTH,
    method: Literal["thompson", "epsilon"] = "thompson",
    epsilon: float = DEFAULT_EPSILON,
    preferred: npt.ArrayLike | None = None,
    preference_weight: float = DEFAULT_PREFERENCE_WEIGHT,
) -> ChannelChoice:
    """The whole ``best_engagement`` routing step: group rates -> member posteriors -> choice.

    ``prior_strength="auto"`` fits it per channel with :func:`fit_prior_strength` (see its caveat).
    """
    rates = group_rates(counts, group, n_groups, group_strength=group_strength)
    strength: float | np.ndarray
    if isinstance(prior_strength, str):
        if prior_strength != "auto":
            raise ValueError("prior_strength must be a positive number or 'auto'")
        strength = fit_prior_strength(counts, group, rates)
    else:
        strength = prior_strength
    alpha, beta = posterior_params(counts, group, rates, prior_strength=strength,
                                   preferred=preferred, preference_weight=preference_weight)
    return choose_channels(alpha, beta, eligible, rng=rng, method=method, epsilon=epsilon)


def group_codes(*keys: Iterable[Hashable]) -> tuple[np.ndarray, list[tuple]]:
    """Integer group codes from one or more per-member key arrays (e.g. age group, segment).

    Returns ``(codes, labels)`` with ``labels[code]`` the tuple of key values. ``None`` is a valid value
    (members with an unknown age group form their own group).
    """
    if not keys:
        raise ValueError("at least one key array is required")
    rows = list(zip(*[list(k) for k in keys], strict=True))
    labels = sorted(set(rows), key=lambda t: tuple((v is None, str(v)) for v in t))
    index = {lab: i for i, lab in enumerate(labels)}
    return np.fromiter((index[r] for r in rows), dtype=np.int64, count=len(rows)), labels
