"""Off-policy evaluation of send-hour and channel rules from the shop's own decision log
(``membercare optimise evaluate``).

The log: marketing messages sent in a window that carry a decision (``policy``, ``chosen_channel``,
``channel_propensity``, ``send_hour``, ``hour_propensity``; migration ``0015_propensity``), the member's group
(``age_group``, ``tier``) and first stated channel, and the reward: at least one click-level event on the message.

A candidate combines a **channel rule** and an **hour rule**, each deterministic per message:

* channel ``logged``: whatever the logging policy chose (its weight is 1), or ``preference``: the member's first
  stated channel (the message counts only when the logger chose that channel);
* hour ``logged``; ``fixed`` (one local hour for everyone, ``--hour``); ``usual`` (each group's most frequent
  logged hour: the shop's own schedule); ``best-time`` (each group's best hour by inverse-propensity weighted
  rates, :mod:`membercare.optimise.causal`, **cross-fitted**: learned on the members of one half and evaluated on
  the other, so the estimate is not flattered by fitting the same data).

IPS, SNIPS and DR (:mod:`membercare.optimise.offpolicy`, outcome model: group x channel rate times the group's
relative hour curve) with intervals clustered by member. Rows without a propensity cannot be used; the
estimate says how many rows matched the candidate and its effective sample size.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import OutboxMessage, OutboxState
from membercare.delivery.routing import CHANNELS
from membercare.engagement.models import EngagementEventRow
from membercare.models import Member, Purpose
from membercare.optimise import causal, offpolicy
from membercare.optimise.history import CLICK_KINDS, group_key
from membercare.optimise.send_time import HOURS, AllowedHours
from membercare.timeutil import ensure_utc

ChannelRule = Literal["logged", "preference"]
HourRule = Literal["logged", "fixed", "usual", "best-time"]


@dataclass
class DecisionLog:
    member_id: np.ndarray
    group: np.ndarray  # int code per row; labels in ``groups``
    channel: np.ndarray  # index into CHANNELS
    hour: np.ndarray
    p_channel: np.ndarray
    p_hour: np.ndarray
    reward: np.ndarray  # 0/1
    first_choice: np.ndarray  # index into CHANNELS of the member's first stated channel (-1: none)
    groups: dict[tuple[str | None, str | None], int]
    skipped: int  # sent rows in the window without a usable decision

    @property
    def n(self) -> int:
        return int(self.reward.size)


def load_decision_log(conn: Connection, since: datetime, until: datetime, *, campaign: str | None = None
                      ) -> DecisionLog:
    """The logged decisions of marketing messages sent in ``[since, until)`` (optionally of one campaign)."""
    o, e, m = OutboxMessage.__table__, EngagementEventRow.__table__, Member.__table__
    clicked = sa.select(e.c.message_id).where(e.c.kind.in_(CLICK_KINDS)).distinct().subquery("clicked")
    where = [o.c.state == OutboxState.SENT.value, o.c.purpose == Purpose.MARKETING.value,
             o.c.sent_at >= ensure_utc(since), o.c.sent_at < ensure_utc(until)]
    if campaign:
        where.append(o.c.campaign == campaign)
    usable = sa.and_(o.c.channel_propensity > 0, o.c.hour_propensity > 0, o.c.send_hour.is_not(None),
                     o.c.chosen_channel == o.c.channel)
    q = (sa.select(o.c.member_id, m.c.age_group, m.c.tier, m.c.preferred_channels, o.c.chosen_channel, o.c.send_hour,
                   o.c.channel_propensity, o.c.hour_propensity, clicked.c.message_id.is_not(None))
         .select_from(o.join(m, m.c.id == o.c.member_id).outerjoin(clicked, clicked.c.message_id == o.c.message_id))
         .where(*where, usable).order_by(o.c.id))
    total = conn.execute(sa.select(sa.func.count()).select_from(o).where(*where)).scalar_one()
    rows = conn.execute(q).all()
    index = {c: i for i, c in enumerate(CHANNELS)}
    groups: dict[tuple[str | None, str | None], int] = {}
    n = len(rows)
    cols = {k: np.empty(n, dt) for k, dt in (("member_id", np.int64), ("group", np.int64), ("channel", np.int64),
                                              ("hour", np.int64), ("p_channel", float), ("p_hour", float),
                                              ("reward", float), ("first_choice", np.int64))}
    for i, (mid, age_group, tier, prefs, ch, hour, pc, ph, engaged) in enumerate(rows):
        first = next((c for c in (prefs or "").split(",") if c in index), None)
        cols["member_id"][i], cols["channel"][i], cols["hour"][i] = mid, index[ch], hour
        cols["group"][i] = groups.setdefault(group_key(age_group, tier), len(groups))
        cols["p_channel"][i], cols["p_hour"][i], cols["reward"][i] = pc, ph, float(bool(engaged))
        cols["first_choice"][i] = index[first] if first is not None else -1
    return DecisionLog(**cols, groups=groups, skipped=int(total) - n)


def _best_hours(log: DecisionLog, rows: np.ndarray, allowed: AllowedHours) -> np.ndarray:
    rates = causal.hour_rates(log.group[rows], log.hour[rows], log.reward[rows], log.p_hour[rows], len(log.groups))
    return causal.best_hours(rates, allowed)


def target_hours(log: DecisionLog, rule: HourRule, *, hour: int | None = None,
                 allowed: AllowedHours = causal.DEFAULT_ALLOWED) -> np.ndarray:
    """The candidate's local send hour for every logged row."""
    if rule == "logged":
        return log.hour.copy()
    if rule == "fixed":
        if hour is None:
            raise ValueError("the fixed hour rule needs an hour")
        return np.full(log.n, allowed.clamp(int(hour)))
    G = len(log.groups)
    if rule == "usual":
        counts = np.zeros((G, HOURS))
        np.add.at(counts, (log.group, log.hour), 1.0)
        return counts.argmax(axis=1)[log.group]
    if rule == "best-time":
        fold = log.member_id % 2 == 0
        out = np.empty(log.n, np.int64)
        for train in (fold, ~fold):
            best = _best_hours(log, np.flatnonzero(train), allowed)
            out[~train] = best[log.group[~train]]
        return out
    raise ValueError(f"unknown hour rule {rule!r}")


def outcome_model(log: DecisionLog) -> np.ndarray:
    """``q[group, channel, hour]``: the group's inverse-propensity weighted channel rate times its relative hour
    curve (the logged data's own rates; a separable model)."""
    G = len(log.groups)
    rc = causal.option_rates(log.group, log.channel, log.reward, log.p_channel, G, len(CHANNELS)).rate
    rh = causal.hour_rates(log.group, log.hour, log.reward, log.p_hour, G).rate
    used = np.bincount(log.hour, minlength=HOURS) > 0
    mean = (rh * used).sum(axis=1, keepdims=True) / max(int(used.sum()), 1)
    rel = rh / np.maximum(mean, 1e-9)
    return rc[:, :, None] * rel[:, None, :]


def evaluate_candidate(log: DecisionLog, *, channel_rule: ChannelRule = "logged", hour_rule: HourRule = "logged",
                       hour: int | None = None, allowed: AllowedHours = causal.DEFAULT_ALLOWED,
                       level: float = 0.95) -> dict[str, offpolicy.Estimate]:
    """IPS, SNIPS and DR estimates of the candidate's engagement rate per message."""
    if log.n == 0:
        raise ValueError("no logged decisions in the window")
    th = target_hours(log, hour_rule, hour=hour, allowed=allowed)
    q = outcome_model(log)
    # The logger's own (randomised) choice is kept under "logged": its probability cancels in the weight.
    pi_hour = log.p_hour if hour_rule == "logged" else (log.hour == th).astype(float)
    if channel_rule == "logged":
        pi = pi_hour * log.p_channel
        tc = log.channel
        # E_pi[q] needs the logger's channel distribution, logged only for the chosen channel: q at the logged
        # channel stands in; its expectation over the logger's channel choice is exactly E_pi[q], so DR stays
        # unbiased (with a little more variance).
    elif channel_rule == "preference":
        tc = np.where(log.first_choice >= 0, log.first_choice, log.channel)
        pi = pi_hour * (log.channel == tc)
    else:
        raise ValueError(f"unknown channel rule {channel_rule!r}")
    mu = log.p_channel * log.p_hour
    return offpolicy.evaluate(log.reward, mu, pi, q_logged=q[log.group, log.channel, log.hour],
                              q_target=q[log.group, tc, th], cluster=log.member_id, level=level)


__all__ = ["DecisionLog", "evaluate_candidate", "load_decision_log", "outcome_model", "target_hours"]
