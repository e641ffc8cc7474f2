"""A journey's funnel and holdout comparison, from its instances and step log (counts only, no member data).

* entered: instances (held-out ones separately), by status;
* per step: how many instances took it, by outcome (``planned``, ``waited``, ``then``, ``timeout``, ...);
* exited, by reason;
* converted: instances whose member placed an order (not cancelled) after entering and up to ``until``, for
  the messaged instances and for the held-out ones, and the difference of the two rates. It is a plain
  difference of proportions: no significance is claimed here (see ``membercare report`` for lift with its
  intervals on campaigns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.journeys.models import InstanceStatus, JourneyInstance, JourneyStep
from membercare.models import Order, OrderStatus


@dataclass
class Funnel:
    journey: str
    by_status: dict[str, int] = field(default_factory=dict)
    steps: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> outcome -> instances
    exited: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)  # "messaged" / "holdout" -> instances

    @property
    def entered(self) -> int:
        return sum(n for s, n in self.by_status.items() if s != InstanceStatus.HOLDOUT.value)

    @property
    def held_out(self) -> int:
        return self.by_status.get(InstanceStatus.HOLDOUT.value, 0)

    def rate(self, group: str) -> float | None:
        n = self.held_out if group == "holdout" else self.entered
        return self.converted.get(group, 0) / n if n else None

    @property
    def lift(self) -> float | None:
        a, b = self.rate("messaged"), self.rate("holdout")
        return a - b if a is not None and b is not None else None


def funnel(conn: Connection, journey: str, until: datetime) -> Funnel:
    t, s, o = JourneyInstance.__table__, JourneyStep.__table__, Order.__table__
    out = Funnel(journey)
    out.by_status = dict(conn.execute(sa.select(t.c.status, sa.func.count()).where(t.c.journey == journey)
                                      .group_by(t.c.status)).tuples().all())
    for step, outcome, n in conn.execute(sa.select(s.c.step, s.c.outcome, sa.func.count()).where(s.c.journey == journey)
                                         .group_by(s.c.step, s.c.outcome)):
        out.steps.setdefault(step, {})[outcome] = n
    out.exited = dict(conn.execute(sa.select(t.c.exit_reason, sa.func.count())
                                   .where(t.c.journey == journey, t.c.status == InstanceStatus.EXITED.value)
                                   .group_by(t.c.exit_reason)).tuples().all())
    bought = sa.exists().where(o.c.member_id == t.c.member_id, o.c.placed_at > t.c.entered_at, o.c.placed_at <= until,
                               o.c.status != OrderStatus.CANCELLED.value)
    group = sa.case((t.c.status == InstanceStatus.HOLDOUT.value, "holdout"), else_="messaged")
    out.converted = dict(conn.execute(sa.select(group, sa.func.count()).where(t.c.journey == journey, bought)
                                      .group_by(group)).tuples().all())
    return out


__all__ = ["Funnel", "funnel"]
