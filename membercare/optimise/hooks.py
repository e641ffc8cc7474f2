"""The planner hooks of a run: ``assign``, ``prefer`` and ``deliver_at`` (:class:`PlanHooks`).

:func:`build_hooks` turns a campaign's ``optimise:`` block (``membercare.campaigns.definition.Optimise``) and
the global-control settings into the three extension points of the outbox planner
(:class:`membercare.delivery.planner.PlanHooks`); ``membercare.campaigns.plan.make_plan_hooks`` calls it, for
real runs and dry runs alike:

* ``assign`` (:class:`Assigner`): global control group (marketing only), then the campaign holdout, then
  the template variant from the occurrence's stored shares (:func:`~membercare.optimise.variants.allocation_for`).
* ``prefer`` (:class:`BestEngagement`, ``routing: best_engagement``): the consented, reachable channel
  with the highest Thompson draw from the member's Beta posterior first.
* ``deliver_at`` (:class:`BestHour`, ``send_time: best_hour``): the next instant at the member's best
  local hour within 24 hours, inside allowed hours.

What they learn from history comes from :mod:`membercare.optimise.history` (aggregated in SQL, cached per
process across the planning groups of a run). Formulas, defaults and assumptions: ``docs/optimisation.md``
(sections 3-5 and 8).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from sqlalchemy.engine import Engine

from membercare.campaigns.definition import Campaign
from membercare.config import Settings
from membercare.delivery.planner import GLOBAL_CONTROL, HOLDOUT, PlanHooks, Recipient
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.delivery.routing import MemberContext, check_channel
from membercare.models import Channel, Purpose
from membercare.optimise import assignment, causal, channel_choice, send_time
from membercare.optimise.causal_history import SendHourRates, cached_channel_rates, cached_send_hour_rates
from membercare.optimise.history import (
    ChannelHistory,
    HourHistory,
    cached_channel_history,
    cached_hour_history,
    group_key,
)
from membercare.optimise.variants import allocation_for
from membercare.timeutil import ensure_utc

CHANNEL_DOMAIN = "channel"  # assignment key domain of the per-member Thompson draw / channel exploration
HOUR_DOMAIN = "hour"  # assignment key domain of send-hour exploration


# ------------------------------------------------------------------------------------------------ assign


class Assigner:
    """The planner's ``assign`` hook: global control, campaign holdout, template variant (in that order).

    A picklable callable; every decision is a pure function of the member id and the run's constants.
    """

    def __init__(self, campaign: str, occurrence: str, *, holdout_rate: float = 0.0, control_rate: float = 0.0,
                 control_salt: str = "membercare", shares: Mapping[str, float] | None = None) -> None:
        self.campaign, self.occurrence = campaign, occurrence
        self.holdout_rate, self.control_rate, self.control_salt = holdout_rate, control_rate, control_salt
        self.shares = dict(shares) if shares else None
        self._setup()

    def _setup(self) -> None:
        self._control = (assignment.key_prefix(assignment.CONTROL, self.control_salt),
                         assignment.threshold(self.control_rate)) if self.control_rate > 0 else None
        self._holdout = (assignment.key_prefix(assignment.HOLDOUT, self.campaign),
                         assignment.threshold(self.holdout_rate)) if self.holdout_rate > 0 else None
        self._pick = assignment.variant_picker(self.campaign, self.occurrence, self.shares) if self.shares else None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_control", "_holdout", "_pick")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def __call__(self, ctx: MemberContext | None, rc: Recipient) -> str | None:
        mid = str(rc.member_id)
        if self._control is not None and assignment.bucket_of_text(self._control[0] + mid) < self._control[1]:
            return GLOBAL_CONTROL
        if self._holdout is not None and assignment.bucket_of_text(self._holdout[0] + mid) < self._holdout[1]:
            return HOLDOUT
        return self._pick(mid) if self._pick is not None else None


def in_control_or_holdout(member_ids: Sequence[int], campaign: str, *, holdout_rate: float, control_rate: float,
                          control_salt: str) -> list[int]:
    """The members of ``member_ids`` that :class:`Assigner` records without a message (no offer coupon for them)."""
    a = Assigner(campaign, "-", holdout_rate=holdout_rate, control_rate=control_rate, control_salt=control_salt)
    return [m for m in member_ids if a(None, Recipient(int(m))) in (HOLDOUT, GLOBAL_CONTROL)]


# ------------------------------------------------------------------------------------- best channel


class _ChannelChooser:
    """Candidates and the decision log shared by the ``prefer`` hooks: the probability of each candidate for the
    member last asked about (:class:`membercare.delivery.decisions.LogsPropensity`)."""

    strategy = "preference"

    def __init__(self, *, campaign: str, occurrence: str, purpose: str, allowed: Sequence[str],
                 explore: float = 0.0, known: Sequence[str] | None = None) -> None:
        self.purpose, self.allowed = str(purpose), frozenset(str(c) for c in allowed)
        self.known = frozenset(known) if known is not None else self.allowed
        self.explore = float(explore)
        self.prefix = assignment.key_prefix(CHANNEL_DOMAIN, campaign, occurrence)
        self.policy_label = causal.policy_name(self.strategy, self.explore)
        self._rng = random.Random()
        self._probs: tuple[int, dict[str, float] | None, str | None] = (-1, None, None)  # member, probs, chosen

    def candidates(self, ctx: MemberContext) -> list[str]:
        return [c for c in dict.fromkeys(ctx.preferred)
                if c in self.allowed and c in self.known and check_channel(ctx, c, self.purpose) is None]

    def propensity(self, member_id: int, option: Any) -> float | None:
        """The probability with which the channel ``option`` was chosen for ``member_id`` (1 when the choice was
        not randomised; None when the member was not the last one asked or ``option`` was not this hook's choice)."""
        mid, probs, chosen = self._probs
        if mid != member_id:
            return None
        if probs is None:
            return 1.0
        return probs.get(str(option)) if str(option) == chosen else None

    def _seed(self, member_id: int) -> random.Random:
        self._rng.seed(assignment.bucket_of_text(self.prefix + str(member_id)))
        return self._rng

    def _choose(self, ctx: MemberContext, rc: Recipient, cands: list[str], greedy: str) -> Sequence[str]:
        """ε-greedy around ``greedy``; the chosen channel first, then the member's own order."""
        chosen, _ = causal.explore_one(greedy, cands, self.explore, self._seed(rc.member_id))
        k = len(cands)
        self._probs = (rc.member_id, {c: float(causal.propensity(self.explore, k, c == greedy)) for c in cands}, chosen)
        return (chosen, *(c for c in ctx.preferred if c != chosen))

    def __call__(self, ctx: MemberContext, rc: Recipient) -> Sequence[str] | None:
        cands = self.candidates(ctx)
        if len(cands) < 2 or self.explore <= 0:
            self._probs = (rc.member_id, None, None)  # the member's own order: deterministic
            return None
        return self._choose(ctx, rc, cands, cands[0])


class ExploreChannel(_ChannelChooser):
    """``routing: preference`` with ``explore > 0``: the member's first routable channel, or with probability ε a
    uniformly random one of their routable channels (logged with its probability)."""


class BestEngagement(_ChannelChooser):
    """The planner's ``prefer`` hook for ``routing: best_engagement``.

    Candidates: the channels the member listed, that the campaign allows and that routing accepts now
    (consent for the purpose, reachable, not suppressed). Each has the member's Beta posterior
    ``Beta(κ·r + e (+w on the member's first stated channel), κ·(1-r) + n - e)``. Without exploration the
    hook takes one Thompson draw per candidate (its probability, logged, by numerical integration); with
    ``explore = ε`` it takes the highest posterior mean, or with probability ε a uniformly random candidate.
    The generator is seeded by (campaign, occurrence, member), so a rerun reorders identically; the chosen
    candidate is moved to the front of the member's own list. Routing still checks every channel.
    """

    strategy = "best_engagement"

    def __init__(self, history: ChannelHistory, *, campaign: str, occurrence: str, purpose: str,
                 allowed: Sequence[str], prior_strength: float = channel_choice.DEFAULT_PRIOR_STRENGTH,
                 preference_weight: float = channel_choice.DEFAULT_PREFERENCE_WEIGHT, explore: float = 0.0,
                 causal_rates: Mapping[tuple[str | None, str | None], Sequence[float]] | None = None) -> None:
        super().__init__(campaign=campaign, occurrence=occurrence, purpose=purpose, allowed=allowed,
                         explore=explore, known=history.channels)
        self.history = history
        if not explore:
            self.policy_label = causal.policy_name("best_engagement_thompson", 0.0)
        self.kappa, self.weight = float(prior_strength), float(preference_weight)
        self.index = {c: i for i, c in enumerate(history.channels)}
        # Per-member work is plain Python on small lists (numpy's per-call overhead would dominate).
        rates = np.clip(history.rates, 1e-6, 1 - 1e-6)
        self._group_rates = {g: rates[i].tolist() for g, i in history.groups.items()}
        # Inverse-propensity weighted group rates from explored sends (causal_history.load_channel_rates) replace
        # the preference-routed ones where a group has enough of them.
        for g, r in (causal_rates or {}).items():
            self._group_rates[g] = np.clip(np.asarray(r, dtype=float), 1e-6, 1 - 1e-6).tolist()
        self._overall = rates[-1].tolist()

    def posterior(self, ctx: MemberContext, channels: Sequence[str]) -> list[tuple[float, float]]:
        """``(alpha, beta)`` of each channel for this member."""
        h = self.history
        row = ctx.row or {}
        r = self._group_rates.get(group_key(row.get("age_group"), row.get("tier")), self._overall)
        i = h.row(ctx.member_id)
        sends = h.sends[i].tolist() if i is not None else None
        engaged = h.engagements[i].tolist() if i is not None else None
        first = ctx.preferred[0] if ctx.preferred else None
        out = []
        for c in channels:
            j = self.index[c]
            n = sends[j] if sends is not None else 0
            e = engaged[j] if engaged is not None else 0
            alpha = self.kappa * r[j] + e + (self.weight if c == first else 0.0)
            out.append((alpha, self.kappa * (1.0 - r[j]) + n - e))
        return out

    def __call__(self, ctx: MemberContext, rc: Recipient) -> Sequence[str] | None:
        cands = self.candidates(ctx)
        if len(cands) < 2:
            self._probs = (rc.member_id, None, None)
            return None  # nothing to choose: routing takes the member's own order
        post = self.posterior(ctx, cands)
        if self.explore > 0:
            means = [a / (a + b) for a, b in post]
            return self._choose(ctx, rc, cands, cands[max(range(len(means)), key=means.__getitem__)])
        rng = self._seed(rc.member_id)
        draws = [rng.betavariate(a, b) for a, b in post]
        best = cands[max(range(len(draws)), key=draws.__getitem__)]
        probs = causal.thompson_probabilities([a for a, _ in post], [b for _, b in post])
        self._probs = (rc.member_id, {c: float(p) for c, p in zip(cands, probs, strict=True)}, best)
        return (best, *(c for c in ctx.preferred if c != best))


# ---------------------------------------------------------------------------------------- best hour


def allowed_hours(policy: PolicySettings) -> send_time.AllowedHours:
    """The whole local hours outside the policy's quiet hours (the whole day without quiet hours)."""
    qh = policy.quiet_hours
    return send_time.AllowedHours.outside(qh.start, qh.end) if qh is not None else send_time.AllowedHours(0, 24)


class _HourChooser:
    """The ``deliver_at`` hooks: a greedy local hour per member (:meth:`greedy_hour`), with probability ε a
    uniformly random allowed hour instead (seeded per campaign, occurrence and member), delivered at the next such
    instant within 24 hours; the probability of the hour is logged (``LogsPropensity``)."""

    strategy = "now"

    def __init__(self, *, as_of: datetime, fallback_timezone: str = "Asia/Taipei", explore: float = 0.0,
                 allowed: send_time.AllowedHours | None = None, campaign: str = "", occurrence: str = "") -> None:
        self.as_of, self.fallback = ensure_utc(as_of), fallback_timezone
        self.explore = float(explore)
        self.allowed = allowed or send_time.AllowedHours(0, 24)
        self.options = [int(h) for h in np.flatnonzero(self.allowed.mask())]
        self.prefix = assignment.key_prefix(HOUR_DOMAIN, campaign, occurrence)
        self.policy_label = causal.policy_name(self.strategy, self.explore)
        self._at: dict[tuple[str, int], datetime] = {}
        self._rng = random.Random()
        self._last: tuple[int, int, int] = (-1, -1, -1)  # (member, greedy hour, chosen hour)

    def zone_name(self, tz: str | None) -> str:
        try:
            return ZoneInfo(tz).key if tz else self.fallback
        except (ZoneInfoNotFoundError, ValueError):
            return self.fallback

    def greedy_hour(self, ctx: MemberContext, zone: str) -> int:
        return self.allowed.clamp(self.as_of.astimezone(ZoneInfo(zone)).hour)

    def propensity(self, member_id: int, option: Any) -> float | None:
        """The probability of the local send hour ``option`` for ``member_id`` (None when it was not this hook's
        choice, e.g. quiet hours of the channel moved it)."""
        mid, greedy, chosen = self._last
        if mid != member_id or int(option) != chosen or chosen not in self.options:
            return None
        return float(causal.propensity(self.explore, len(self.options), int(option) == greedy))

    def __call__(self, ctx: MemberContext, rc: Recipient, first_channel: str) -> datetime | None:
        zone = self.zone_name(ctx.timezone)
        hour = greedy = self.greedy_hour(ctx, zone)
        if self.explore > 0:
            self._rng.seed(assignment.bucket_of_text(self.prefix + str(rc.member_id)))
            hour, _ = causal.explore_one(greedy, self.options, self.explore, self._rng)
        self._last = (rc.member_id, greedy, hour)
        key = (zone, hour)
        at = self._at.get(key)
        if at is None:
            at = self._at[key] = send_time.next_delivery_at(self.as_of, key[0], hour)
        return at


class ExploreHour(_HourChooser):
    """``send_time: immediate`` with ``explore > 0``: now (the current local hour, or the next allowed one), or
    with probability ε a uniformly random allowed hour within the next 24 hours."""


class BestHour(_HourChooser):
    """The planner's ``deliver_at`` hook for ``send_time: best_hour``.

    The next instant at the member's best local hour (their own, else their group's typical hour, from the
    hours of past engagement) at or after ``as_of``: ``as_of`` itself when the member is inside that hour now
    (sent as usual), else within 24 hours (the planner defers the row with reason ``send_time``).
    """

    strategy = "best_hour"

    def __init__(self, history: HourHistory, *, as_of: datetime, fallback_timezone: str = "Asia/Taipei",
                 explore: float = 0.0, allowed: send_time.AllowedHours | None = None, campaign: str = "",
                 occurrence: str = "") -> None:
        super().__init__(as_of=as_of, fallback_timezone=fallback_timezone, explore=explore, allowed=allowed,
                         campaign=campaign, occurrence=occurrence)
        self.history = history

    def greedy_hour(self, ctx: MemberContext, zone: str) -> int:
        row = ctx.row or {}
        return self.history.hour_for(ctx.member_id, row.get("age_group"), row.get("tier"))[0]


class CausalHour(_HourChooser):
    """The planner's ``deliver_at`` hook for ``send_time: causal_hour``: the allowed hour at which messages sent
    to the member's ``(age_group, tier)`` group engaged most, inverse-propensity weighted
    (:mod:`membercare.optimise.causal_history`), with ε exploration."""

    strategy = "causal_hour"

    def __init__(self, rates: SendHourRates, *, as_of: datetime, fallback_timezone: str = "Asia/Taipei",
                 explore: float = 0.0, allowed: send_time.AllowedHours | None = None, campaign: str = "",
                 occurrence: str = "") -> None:
        super().__init__(as_of=as_of, fallback_timezone=fallback_timezone, explore=explore, allowed=allowed,
                         campaign=campaign, occurrence=occurrence)
        self.rates = rates

    def greedy_hour(self, ctx: MemberContext, zone: str) -> int:
        row = ctx.row or {}
        return self.rates.hour_for(row.get("age_group"), row.get("tier"))


# ------------------------------------------------------------------------------------------- building


def build_hooks(engine: Engine, campaign: Campaign, *, occurrence: str, as_of: datetime, holdout_rate: float,
                channels: Sequence[Channel], settings: Settings, store_allocation: bool = True,
                policy: PolicySettings | None = None) -> PlanHooks:
    """The planner hooks of one campaign occurrence: ``assign``, ``prefer``, ``deliver_at``.

    ``assign`` is None when there is nothing to assign (no holdout, no control group, no variants);
    ``prefer`` / ``deliver_at`` are set only when the campaign opts in. ``channels`` are the channels the
    run may use; ``store_allocation=False`` (dry runs) computes variant shares without storing them.
    """
    name = campaign.name
    opt = campaign.optimise
    marketing = Purpose(campaign.purpose) == Purpose.MARKETING
    control_rate = float(settings.global_control_rate) if marketing else 0.0
    shares = None
    if opt.variants is not None:
        alloc = allocation_for(engine, name, occurrence, as_of, opt.variants, store=store_allocation)
        shares = alloc.shares
    assign = None
    if holdout_rate > 0 or control_rate > 0 or shares:
        assign = Assigner(name, occurrence, holdout_rate=holdout_rate, control_rate=control_rate,
                          control_salt=settings.global_control_salt, shares=shares)
    eps = float(opt.explore)
    if opt.routing == "best_engagement" or opt.send_time != "immediate" or eps > 0:
        if policy is None:
            with engine.connect() as conn:
                policy = load_policy(conn)
    purpose = Purpose(campaign.purpose).value
    chooser: _ChannelChooser | None = None
    if opt.routing == "best_engagement":
        chooser = BestEngagement(cached_channel_history(engine, as_of), purpose=purpose, allowed=channels,
                                 explore=eps, campaign=name, occurrence=occurrence,
                                 causal_rates=cached_channel_rates(engine, as_of) if eps > 0 else None)
    elif eps > 0:
        chooser = ExploreChannel(purpose=purpose, allowed=channels, explore=eps, campaign=name, occurrence=occurrence)
    prefer = chooser
    timer: _HourChooser | None = None
    if policy is not None:
        allowed = allowed_hours(policy)
        tz = policy.fallback_timezone
        if opt.send_time == "best_hour":
            hours = cached_hour_history(engine, as_of, allowed=allowed, fallback_timezone=tz)
            timer = BestHour(hours, as_of=as_of, fallback_timezone=tz, explore=eps, allowed=allowed, campaign=name,
                             occurrence=occurrence)
        elif opt.send_time == "causal_hour":
            timer = CausalHour(cached_send_hour_rates(engine, as_of, allowed=allowed), as_of=as_of,
                               fallback_timezone=tz, explore=eps, allowed=allowed, campaign=name, occurrence=occurrence)
        elif eps > 0:
            timer = ExploreHour(as_of=as_of, fallback_timezone=tz, explore=eps, allowed=allowed, campaign=name,
                                occurrence=occurrence)
    deliver_at = timer
    return PlanHooks(assign, prefer, deliver_at)


__all__ = ["Assigner", "BestEngagement", "BestHour", "CausalHour", "ExploreChannel", "ExploreHour", "PlanHooks",
           "allowed_hours", "build_hooks", "in_control_or_holdout"]
