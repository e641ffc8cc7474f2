"""The decision log read back for causal learning: per member group and local send hour, the
inverse-propensity weighted engagement of the marketing messages *sent* at that hour (``send_time: causal_hour``).

One SQL ``GROUP BY`` over the outbox rows that carry a decision (``send_hour``, ``hour_propensity``; migration
``0015_propensity``), joined to click-level engagement of the message itself: ``Σ 1/μ`` and ``Σ engaged/μ`` per
``(age_group, tier, send_hour)``. The hour a member happened to engage at is never read, so the shop's own
schedule cannot come back as "best" (:mod:`membercare.optimise.causal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.delivery.models import OutboxMessage, OutboxState
from membercare.delivery.routing import CHANNELS
from membercare.engagement.models import EngagementEventRow
from membercare.models import Member, Purpose
from membercare.optimise import causal
from membercare.optimise.history import CLICK_KINDS, DEFAULT_LOOKBACK, _cached, _engine_key, group_key
from membercare.optimise.send_time import DEFAULT_HOUR, HOURS, AllowedHours, kernel_matrix
from membercare.timeutil import ensure_utc

DEFAULT_MIN_WEIGHT = 200.0  # inverse-propensity weighted messages a group needs before its own curve is used


@dataclass
class SendHourRates:
    """Best allowed send hour per ``(age_group, tier)`` group (the population's for unknown groups)."""

    groups: dict[tuple[str | None, str | None], int]
    best: np.ndarray  # (groups + 1,): the last entry is the population's
    rates: causal.OptionRates  # rows as ``best``

    def hour_for(self, age_group: str | None, tier: str | None) -> int:
        return int(self.best[self.groups.get(group_key(age_group, tier), self.best.size - 1)])


def load_send_hour_rates(conn: Connection, as_of: datetime, *, allowed: AllowedHours = causal.DEFAULT_ALLOWED,
                         lookback: timedelta = DEFAULT_LOOKBACK, default_hour: int = DEFAULT_HOUR,
                         strength: float = causal.DEFAULT_STRENGTH,
                         min_weight: float = DEFAULT_MIN_WEIGHT) -> SendHourRates:
    """Inverse-propensity weighted engagement per group and local send hour of the marketing messages sent in
    ``[as_of - lookback, as_of)``; each group's best allowed hour (``default_hour``, clamped into the allowed
    hours, while a group has less than ``min_weight`` of evidence; the population's curve fills in)."""
    as_of = ensure_utc(as_of)
    o, e, m = OutboxMessage.__table__, EngagementEventRow.__table__, Member.__table__
    clicked = sa.select(e.c.message_id).where(e.c.kind.in_(CLICK_KINDS)).distinct().subquery("clicked")
    inv = 1.0 / o.c.hour_propensity
    q = (sa.select(m.c.age_group, m.c.tier, o.c.send_hour, sa.func.count(), sa.func.sum(inv),
                   sa.func.sum(sa.case((clicked.c.message_id.is_not(None), inv), else_=0.0)))
         .select_from(o.join(m, m.c.id == o.c.member_id)
                      .outerjoin(clicked, clicked.c.message_id == o.c.message_id))
         .where(o.c.state == OutboxState.SENT.value, o.c.purpose == Purpose.MARKETING.value,
                o.c.sent_at >= as_of - lookback, o.c.sent_at < as_of,
                o.c.send_hour.is_not(None), o.c.hour_propensity > 0)
         .group_by(m.c.age_group, m.c.tier, o.c.send_hour))
    groups: dict[tuple[str | None, str | None], int] = {}
    rows = conn.execute(q).all()
    for age_group, tier, *_ in rows:
        groups.setdefault(group_key(age_group, tier), len(groups))
    G = len(groups)
    W, S, M = np.zeros((G, HOURS)), np.zeros((G, HOURS)), np.zeros((G, HOURS))
    for age_group, tier, hour, n, w, s in rows:
        gi = groups[group_key(age_group, tier)]
        W[gi, int(hour)] += float(w or 0)
        S[gi, int(hour)] += float(s or 0)
        M[gi, int(hour)] += int(n)
    # The population as one more group: its own evidence is everyone's.
    W, S, M = (np.vstack([X, X.sum(axis=0, keepdims=True)]) for X in (W, S, M))
    rates = causal.rates_from_sums(W, S, M, strength=strength, smooth=kernel_matrix())
    best = causal.best_hours(rates, allowed, default_hour=default_hour, min_weight=min_weight)
    pop = int(best[-1])
    best[:-1] = np.where(rates.weight[:-1].sum(axis=1) >= min_weight, best[:-1], pop)
    return SendHourRates(groups, best, rates)


def cached_send_hour_rates(engine: Engine, as_of: datetime, *, allowed: AllowedHours = causal.DEFAULT_ALLOWED,
                           default_hour: int = DEFAULT_HOUR) -> SendHourRates:
    """:func:`load_send_hour_rates`, cached per database, ``as_of`` and allowed hours (``history.CACHE_SECONDS``)."""
    def load() -> SendHourRates:
        with engine.connect() as conn:
            return load_send_hour_rates(conn, as_of, allowed=allowed, default_hour=default_hour)

    return _cached((_engine_key(engine), "send_hours", as_of, allowed, default_hour), load)


def load_channel_rates(conn: Connection, as_of: datetime, *, lookback: timedelta = DEFAULT_LOOKBACK,
                       strength: float = causal.DEFAULT_STRENGTH, min_weight: float = DEFAULT_MIN_WEIGHT
                       ) -> dict[tuple[str | None, str | None], list[float]]:
    """Inverse-propensity weighted click rate per ``(age_group, tier)`` and channel (columns as
    :data:`membercare.delivery.routing.CHANNELS`) of the marketing messages sent in ``[as_of - lookback, as_of)``
    with a logged channel probability, for the groups with at least ``min_weight`` of evidence: the rate each
    channel would have if the whole group got it, unlike rates of preference-routed history (members who chose a
    channel differ from those who did not). ``best_engagement`` uses them as the group prior when present."""
    as_of = ensure_utc(as_of)
    o, e, m = OutboxMessage.__table__, EngagementEventRow.__table__, Member.__table__
    clicked = sa.select(e.c.message_id).where(e.c.kind.in_(CLICK_KINDS)).distinct().subquery("clicked")
    inv = 1.0 / o.c.channel_propensity
    q = (sa.select(m.c.age_group, m.c.tier, o.c.chosen_channel, sa.func.count(), sa.func.sum(inv),
                   sa.func.sum(sa.case((clicked.c.message_id.is_not(None), inv), else_=0.0)))
         .select_from(o.join(m, m.c.id == o.c.member_id)
                      .outerjoin(clicked, clicked.c.message_id == o.c.message_id))
         .where(o.c.state == OutboxState.SENT.value, o.c.purpose == Purpose.MARKETING.value,
                o.c.sent_at >= as_of - lookback, o.c.sent_at < as_of, o.c.chosen_channel == o.c.channel,
                o.c.channel_propensity > 0)
         .group_by(m.c.age_group, m.c.tier, o.c.chosen_channel))
    index = {c: i for i, c in enumerate(CHANNELS)}
    groups: dict[tuple[str | None, str | None], int] = {}
    rows = [r for r in conn.execute(q).all() if r[2] in index]
    for age_group, tier, *_ in rows:
        groups.setdefault(group_key(age_group, tier), len(groups))
    G, C = len(groups), len(CHANNELS)
    W, S, M = np.zeros((G, C)), np.zeros((G, C)), np.zeros((G, C))
    for age_group, tier, ch, n, w, s in rows:
        gi = groups[group_key(age_group, tier)]
        W[gi, index[ch]] += float(w or 0)
        S[gi, index[ch]] += float(s or 0)
        M[gi, index[ch]] += int(n)
    if not G:
        return {}
    rates = causal.rates_from_sums(W, S, M, strength=strength)
    return {g: rates.rate[i].tolist() for g, i in groups.items() if rates.weight[i].sum() >= min_weight}


def cached_channel_rates(engine: Engine, as_of: datetime) -> dict[tuple[str | None, str | None], list[float]]:
    """:func:`load_channel_rates`, cached per database and ``as_of``."""
    def load() -> dict[tuple[str | None, str | None], list[float]]:
        with engine.connect() as conn:
            return load_channel_rates(conn, as_of)

    return _cached((_engine_key(engine), "channel_rates", as_of), load)


__all__ = ["SendHourRates", "cached_channel_rates", "cached_send_hour_rates", "load_channel_rates",
           "load_send_hour_rates"]
