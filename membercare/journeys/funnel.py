"""A journey's funnel and holdout comparison, from its instances and step log (counts only, no member data).

* entered: instances (held-out ones separately), by status;
* per step, in the order instances first took them: how many instances took it (``reached``), by outcome
  (``planned``, ``waited``, ``then``, ``timeout``, ...), and for a send how many of its outbox rows were sent;
* exited, by reason;
* converted: instances whose member bought after entering (an order, not cancelled or refunded, or an
  ``order.placed`` member event: a purchase as the journey's exits see one), up to ``until`` or, with
  ``window``, within that long after entering, for the messaged instances and the held-out ones;
  ``attributed``: messaged instances with an order credited to one of their messages;
* per arm, the member-level sums a clustered interval needs (:class:`ClusterSums`): a member who re-enters has
  several instances, and they are not independent.

``journeys show`` prints the counts; ``membercare report`` adds the intervals (:mod:`membercare.reports.journeys`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.cluster_sums import ClusterSums
from membercare.db import is_sqlite
from membercare.delivery.models import OutboxMessage, OutboxState
from membercare.engagement.attribution import within_window
from membercare.engagement.attribution_models import Attribution, ConversionType
from membercare.journeys.conditions import PURCHASE_EVENTS
from membercare.journeys.models import InstanceStatus, JourneyInstance, JourneyStep, MemberEvent
from membercare.models import PURCHASE_STATUSES, Order

MESSAGED, HOLDOUT = "messaged", "holdout"


@dataclass
class Funnel:
    journey: str
    by_status: dict[str, int] = field(default_factory=dict)
    steps: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> outcome -> instances, in order
    kinds: dict[str, str] = field(default_factory=dict)  # step -> send, wait, wait_for, branch
    sent: dict[str, int] = field(default_factory=dict)  # send step -> its outbox rows in state sent
    exited: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)  # "messaged" / "holdout" -> instances
    attributed: int = 0  # messaged instances with an order credited to one of their messages
    members: dict[str, ClusterSums] = field(default_factory=dict)  # "messaged" / "holdout" -> member-level sums

    @property
    def entered(self) -> int:
        return sum(n for s, n in self.by_status.items() if s != InstanceStatus.HOLDOUT.value)

    @property
    def held_out(self) -> int:
        return self.by_status.get(InstanceStatus.HOLDOUT.value, 0)

    def reached(self, step: str) -> int:
        return sum(self.steps.get(step, {}).values())

    def rate(self, group: str) -> float | None:
        n = self.held_out if group == HOLDOUT else self.entered
        return self.converted.get(group, 0) / n if n else None

    @property
    def lift(self) -> float | None:
        a, b = self.rate(MESSAGED), self.rate(HOLDOUT)
        return a - b if a is not None and b is not None else None


def funnel(conn: Connection, journey: str, until: datetime, *, since: datetime | None = None,
           window_seconds: int | None = None, attribution_model: str = "last_touch") -> Funnel:
    """The funnel of the instances of ``journey`` that entered before ``until`` (and at or after ``since``).

    Converted: an order after entering and before ``until``; with ``window_seconds``, within that long after
    entering instead (``[entered, entered + window)``), the same for both arms."""
    t, s, o, ob = JourneyInstance.__table__, JourneyStep.__table__, Order.__table__, OutboxMessage.__table__
    scoped = [t.c.journey == journey, t.c.entered_at < until]
    if since is not None:
        scoped.append(t.c.entered_at >= since)
    out = Funnel(journey)
    out.by_status = dict(conn.execute(sa.select(t.c.status, sa.func.count()).where(*scoped)
                                      .group_by(t.c.status)).tuples().all())
    in_scope = s.join(t, t.c.id == s.c.instance_id)
    steps = conn.execute(sa.select(s.c.step, s.c.kind, s.c.outcome, sa.func.count().label("n"),
                                   sa.func.min(s.c.id).label("first")).select_from(in_scope).where(*scoped)
                         .group_by(s.c.step, s.c.kind, s.c.outcome)).all()
    first: dict[str, int] = {}
    for r in steps:
        first[r.step] = min(first.get(r.step, r.first), r.first)
        out.kinds[r.step] = r.kind
    for r in sorted(steps, key=lambda r: (first[r.step], r.outcome)):
        out.steps.setdefault(r.step, {})[r.outcome] = r.n
    out.sent = dict(conn.execute(
        sa.select(s.c.step, sa.func.count()).select_from(in_scope.join(ob, ob.c.idempotency_key == s.c.message_key))
        .where(*scoped, ob.c.state == OutboxState.SENT.value).group_by(s.c.step)).tuples().all())
    out.exited = dict(conn.execute(sa.select(t.c.exit_reason, sa.func.count())
                                   .where(*scoped, t.c.status == InstanceStatus.EXITED.value)
                                   .group_by(t.c.exit_reason)).tuples().all())
    ev = MemberEvent.__table__

    def after(at: sa.ColumnElement[datetime]) -> sa.ColumnElement[bool]:
        if window_seconds is not None:
            return within_window(conn, at, t.c.entered_at, window_seconds)
        return sa.and_((_ms(at) > _ms(t.c.entered_at)) if is_sqlite(conn) else (at > t.c.entered_at), at < until)

    # A purchase as the journeys' exits and branches see one: an order, or an order.placed member event.
    bought = sa.or_(
        sa.exists().where(o.c.member_id == t.c.member_id, o.c.status.in_(PURCHASE_STATUSES), after(o.c.placed_at)),
        sa.exists().where(ev.c.member_id == t.c.member_id, ev.c.name.in_(PURCHASE_EVENTS), after(ev.c.occurred_at)))
    group = sa.case((t.c.status == InstanceStatus.HOLDOUT.value, HOLDOUT), else_=MESSAGED)
    per_instance = sa.select(t.c.member_id, group.label("arm"), sa.case((bought, 1), else_=0).label("y")) \
        .where(*scoped).subquery("per_instance")
    per_member = sa.select(per_instance.c.arm, per_instance.c.member_id, sa.func.count().label("m"),
                           sa.func.sum(per_instance.c.y).label("y")) \
        .group_by(per_instance.c.arm, per_instance.c.member_id).subquery("per_member")
    pm = per_member.c
    for r in conn.execute(sa.select(pm.arm, sa.func.count().label("n"), sa.func.sum(pm.m).label("m"),
                                    sa.func.sum(pm.y).label("y"), sa.func.sum(pm.m * pm.m).label("mm"),
                                    sa.func.sum(pm.y * pm.m).label("ym"), sa.func.sum(pm.y * pm.y).label("yy"))
                          .group_by(pm.arm)):
        out.members[r.arm] = ClusterSums(int(r.n), float(r.m), float(r.y), float(r.mm), float(r.ym), float(r.yy))
        if r.y:
            out.converted[r.arm] = int(r.y)
    a = Attribution.__table__
    credited = sa.exists().where(a.c.message_id == ob.c.message_id, a.c.model == attribution_model,
                                 a.c.conversion_type == ConversionType.ORDER.value)
    out.attributed = int(conn.execute(
        sa.select(sa.func.count(sa.distinct(t.c.id))).select_from(in_scope.join(
            ob, ob.c.idempotency_key == s.c.message_key)).where(*scoped, credited)).scalar() or 0)
    return out


def _ms(col: sa.ColumnElement[datetime]) -> sa.ColumnElement[int]:
    """Integer milliseconds of a timestamp on SQLite, whose stored text may mix formats (with and without
    microseconds): compared as text, two instants of the same second could order wrongly."""
    return sa.cast(sa.func.round((sa.func.julianday(col) - 2440587.5) * 86400000.0), sa.BigInteger)


def journeys_entered(conn: Connection, since: datetime, until: datetime) -> list[str]:
    """The journeys with instances that entered in ``[since, until)``, by name."""
    t = JourneyInstance.__table__
    return list(conn.execute(sa.select(t.c.journey).where(t.c.entered_at >= since, t.c.entered_at < until)
                             .distinct().order_by(t.c.journey)).scalars())


__all__ = ["HOLDOUT", "MESSAGED", "Funnel", "funnel", "journeys_entered"]
