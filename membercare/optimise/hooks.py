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
from membercare.optimise import assignment, channel_choice, send_time
from membercare.optimise.history import (
    ChannelHistory,
    HourHistory,
    cached_channel_history,
    cached_hour_history,
    group_key,
)
from membercare.optimise.variants import allocation_for
from membercare.timeutil import ensure_utc

CHANNEL_DOMAIN = "channel"  # assignment key domain of the per-member Thompson draw


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


class BestEngagement:
    """The planner's ``prefer`` hook for ``routing: best_engagement``.

    Candidates: the channels the member listed, that the campaign allows and that routing accepts now
    (consent for the purpose, reachable, not suppressed). Each gets one draw from the member's Beta
    posterior ``Beta(κ·r + e (+w on the member's first stated channel), κ·(1-r) + n - e)`` with a
    generator seeded by (campaign, occurrence, member), so a rerun reorders identically; the best
    candidate is moved to the front of the member's own list. Routing still checks every channel.
    """

    def __init__(self, history: ChannelHistory, *, campaign: str, occurrence: str, purpose: str,
                 allowed: Sequence[str], prior_strength: float = channel_choice.DEFAULT_PRIOR_STRENGTH,
                 preference_weight: float = channel_choice.DEFAULT_PREFERENCE_WEIGHT) -> None:
        self.history, self.purpose, self.allowed = history, str(purpose), frozenset(str(c) for c in allowed)
        self.kappa, self.weight = float(prior_strength), float(preference_weight)
        self.prefix = assignment.key_prefix(CHANNEL_DOMAIN, campaign, occurrence)
        self.index = {c: i for i, c in enumerate(history.channels)}
        # Per-member work is plain Python on small lists (numpy's per-call overhead would dominate).
        rates = np.clip(history.rates, 1e-6, 1 - 1e-6)
        self._group_rates = {g: rates[i].tolist() for g, i in history.groups.items()}
        self._overall = rates[-1].tolist()
        self._rng = random.Random()

    def candidates(self, ctx: MemberContext) -> list[str]:
        return [c for c in dict.fromkeys(ctx.preferred)
                if c in self.allowed and c in self.index and check_channel(ctx, c, self.purpose) is None]

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
            return None  # nothing to choose: routing takes the member's own order
        rng = self._rng
        rng.seed(assignment.bucket_of_text(self.prefix + str(rc.member_id)))
        draws = [rng.betavariate(a, b) for a, b in self.posterior(ctx, cands)]
        best = cands[max(range(len(draws)), key=draws.__getitem__)]
        return (best, *(c for c in ctx.preferred if c != best))


# ---------------------------------------------------------------------------------------- best hour


def allowed_hours(policy: PolicySettings) -> send_time.AllowedHours:
    """The whole local hours outside the policy's quiet hours (the whole day without quiet hours)."""
    qh = policy.quiet_hours
    return send_time.AllowedHours.outside(qh.start, qh.end) if qh is not None else send_time.AllowedHours(0, 24)

class BestHour:
    """The planner's ``deliver_at`` hook for ``send_time: best_hour``.

    The next instant at the member's best local hour (their own, else their group's typical hour) at
    or after ``as_of``: ``as_of`` itself when the member is inside that hour now (sent as usual), else
    within 24 hours (the planner defers the row with reason ``send_time``).
    """

    def __init__(self, history: HourHistory, *, as_of: datetime, fallback_timezone: str = "Asia/Taipei") -> None:
        self.history, self.as_of, self.fallback = history, ensure_utc(as_of), fallback_timezone
        self._at: dict[tuple[str, int], datetime] = {}

    def zone_name(self, tz: str | None) -> str:
        try:
            return ZoneInfo(tz).key if tz else self.fallback
        except (ZoneInfoNotFoundError, ValueError):
            return self.fallback

    def __call__(self, ctx: MemberContext, rc: Recipient, first_channel: str) -> datetime | None:
        row = ctx.row or {}
        hour, _ = self.history.hour_for(ctx.member_id, row.get("age_group"), row.get("tier"))
        key = (self.zone_name(ctx.timezone), hour)
        at = self._at.get(key)
        if at is None:
            at = self._at[key] = send_time.next_delivery_at(self.as_of, key[0], hour)
        return at


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
    assign = prefer = deliver_at = None
    if holdout_rate > 0 or control_rate > 0 or shares:
        assign = Assigner(name, occurrence, holdout_rate=holdout_rate, control_rate=control_rate,
                          control_salt=settings.global_control_salt, shares=shares)
    if opt.routing == "best_engagement" or opt.send_time == "best_hour":
        if policy is None:
            with engine.connect() as conn:
                policy = load_policy(conn)
    if opt.routing == "best_engagement":
        prefer = BestEngagement(cached_channel_history(engine, as_of), campaign=name, occurrence=occurrence,
                                purpose=Purpose(campaign.purpose).value, allowed=channels)
    if opt.send_time == "best_hour":
        assert policy is not None  # loaded above for best_hour
        hours = cached_hour_history(engine, as_of, allowed=allowed_hours(policy),
                                    fallback_timezone=policy.fallback_timezone)
        deliver_at = BestHour(hours, as_of=as_of, fallback_timezone=policy.fallback_timezone)
    return PlanHooks(assign, prefer, deliver_at)


__all__ = ["Assigner", "BestEngagement", "BestHour", "PlanHooks", "allowed_hours", "build_hooks",
           "in_control_or_holdout"]
