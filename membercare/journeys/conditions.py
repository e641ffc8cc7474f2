"""What the advancer reads about a member: exit conditions, branch conditions and whether an event happened.

Every function takes the instance as plain data and the instant to judge at (the advancer's injected clock),
reads inside the caller's transaction and writes nothing. Each answer carries its reason in words (for the
step log and ``membercare journeys simulate``); reasons name events and attributes, never contact data.

Events: ``purchased`` is an order placed (not cancelled) or an ``order.placed`` member event; ``opened`` and
``clicked`` are engagement with a message of *this instance* (its outbox rows carry the instance in their
idempotency key); any other name is a member event (``member_events``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.campaigns.definition import SegmentRef
from membercare.delivery.models import OutboxMessage
from membercare.engagement.models import EngagementEventRow
from membercare.journeys.definition import Condition, Exit
from membercare.journeys.models import JourneyStep, MemberEvent
from membercare.models import Consent, Member, Order, OrderStatus, Purpose
from segments.base import context as segment_context
from segments.base import ref as segment_ref

PURCHASE_EVENTS = ("order.placed",)
# Engagement kinds that count as an open or a click of a message (a push open is a click: the member tapped it).
CLICK_KINDS = ("clicked", "push_opened")
OPEN_KINDS = ("opened", *CLICK_KINDS)
MEMBER_ATTRIBUTES = ("tier", "locale", "region", "city", "country", "age_group", "points_balance", "timezone",
                     "birthday", "joined_at")


@dataclass(frozen=True)
class InstanceView:
    """An instance as the evaluators need it (plain data, no contact data)."""

    id: int
    journey: str
    member_id: int
    entered_at: datetime
    step: str | None = None
    step_started_at: datetime | None = None
    context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any) -> InstanceView:
        try:
            ctx = json.loads(row.context or "{}")
        except ValueError:
            ctx = {}
        return cls(row.id, row.journey, row.member_id, row.entered_at, row.step, row.step_started_at,
                   ctx if isinstance(ctx, dict) else {})

    @property
    def key_suffix(self) -> str:
        """How this instance's outbox rows end (``planner.idempotency_key`` with ``instance``)."""
        return f"|@{self.id}"


def event_happened(conn: Connection, inst: InstanceView, name: str, since: datetime, until: datetime) -> bool:
    """Whether ``name`` happened for the instance's member in ``(since, until]``."""
    m = inst.member_id
    if name == "purchased":
        o = Order.__table__
        if conn.execute(sa.select(o.c.id).where(o.c.member_id == m, o.c.placed_at > since, o.c.placed_at <= until,
                                                o.c.status != OrderStatus.CANCELLED.value).limit(1)).first():
            return True
        return _member_event(conn, m, PURCHASE_EVENTS, since, until)
    if name in ("opened", "clicked"):
        ob, ev = OutboxMessage.__table__, EngagementEventRow.__table__
        mine = sa.select(ob.c.message_id).where(ob.c.member_id == m,
                                                ob.c.idempotency_key.like(f"%{inst.key_suffix}"))
        kinds = CLICK_KINDS if name == "clicked" else OPEN_KINDS
        return conn.execute(sa.select(ev.c.id).where(ev.c.member_id == m, ev.c.kind.in_(kinds),
                                                     ev.c.occurred_at > since, ev.c.occurred_at <= until,
                                                     ev.c.message_id.in_(mine)).limit(1)).first() is not None
    return _member_event(conn, m, (name,), since, until)


def _member_event(conn: Connection, member_id: int, names: tuple[str, ...], since: datetime,
                  until: datetime) -> bool:
    e = MemberEvent.__table__
    return conn.execute(sa.select(e.c.id).where(e.c.member_id == member_id, e.c.name.in_(names),
                                                e.c.occurred_at > since, e.c.occurred_at <= until)
                        .limit(1)).first() is not None


def in_segment(conn: Connection, seg: SegmentRef, member_id: int, at: datetime, shop_timezone: str) -> bool:
    """Whether the member is in the segment at ``at`` (the segment's SQL, narrowed to one member)."""
    q = segment_ref(seg.name, **seg.params).select(segment_context(conn, at, shop_timezone)).subquery()
    return conn.execute(sa.select(q.c.member_id).where(q.c.member_id == member_id).limit(1)).first() is not None


def unsubscribed(conn: Connection, member_id: int, since: datetime, until: datetime) -> bool:
    """A marketing consent of the member was withdrawn in ``(since, until]``: after entering (a refusal recorded
    with the sign-up itself, at the instant the welcome journey enters, is not an unsubscribe) and not after the
    instant judged at (an advancer or a simulation at an earlier instant must not see a later withdrawal)."""
    c = Consent.__table__
    return conn.execute(sa.select(c.c.id).where(c.c.member_id == member_id, c.c.purpose == Purpose.MARKETING.value,
                                                c.c.granted.is_(False), c.c.changed_at > since,
                                                c.c.changed_at <= until)
                        .limit(1)).first() is not None


def exit_reason(conn: Connection, rules: Exit, inst: InstanceView, now: datetime, shop_timezone: str) -> str | None:
    """Why the instance leaves the journey now, or None: checked before every step."""
    if rules.purchased and event_happened(conn, inst, "purchased", inst.entered_at, now):
        return "purchased"
    if rules.unsubscribed and unsubscribed(conn, inst.member_id, inst.entered_at, now):
        return "unsubscribed"
    for name in rules.events:
        if event_happened(conn, inst, name, inst.entered_at, now):
            return f"event {name}"
    if rules.left_segment is not None and not in_segment(conn, rules.left_segment, inst.member_id, now,
                                                          shop_timezone):
        return f"left segment {rules.left_segment.name}"
    return None


def step_time(conn: Connection, instance_id: int, step_id: str) -> datetime | None:
    s = JourneyStep.__table__
    return conn.execute(sa.select(s.c.at).where(s.c.instance_id == instance_id, s.c.step == step_id)).scalar()


def attribute_value(conn: Connection, inst: InstanceView, name: str) -> Any:
    """A member column (``tier``, ``points_balance``, ...) or ``context.<key>`` of the entry event."""
    if name.startswith("context."):
        value: Any = inst.context
        for part in name.split(".")[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        return value
    if name not in MEMBER_ATTRIBUTES:
        raise ValueError(f"unknown attribute {name!r} (member attributes: {', '.join(MEMBER_ATTRIBUTES)}, "
                         f"or context.<key>)")
    m = Member.__table__
    return conn.execute(sa.select(m.c[name]).where(m.c.id == inst.member_id)).scalar()


def _compare(cond: Condition, value: Any) -> bool:
    if cond.equals is not None and value != cond.equals:
        return False
    if cond.in_ is not None and value not in cond.in_:
        return False
    try:
        if cond.gte is not None and (value is None or float(value) < cond.gte):
            return False
        if cond.lte is not None and (value is None or float(value) > cond.lte):
            return False
    except (TypeError, ValueError):
        return False
    return True


def evaluate(conn: Connection, cond: Condition, inst: InstanceView, now: datetime,
             shop_timezone: str) -> tuple[bool, str]:
    """A branch condition: (answer, the reason in words)."""
    if cond.attribute is not None:
        value = attribute_value(conn, inst, cond.attribute)
        ok = _compare(cond, value)
        shown = "set" if cond.attribute in ("birthday",) and value is not None else repr(value)
        return ok, f"{cond.attribute} is {shown}: condition {'holds' if ok else 'does not hold'}"
    if cond.segment is not None:
        ok = in_segment(conn, SegmentRef(name=cond.segment, params=cond.params), inst.member_id, now, shop_timezone)
        return ok, f"{'in' if ok else 'not in'} segment {cond.segment}"
    since = inst.entered_at if cond.since == "entry" else (step_time(conn, inst.id, cond.since) or inst.entered_at)
    name = cond.event or cond.engaged or ""
    ok = event_happened(conn, inst, name, since, now)
    return ok, f"{name} {'happened' if ok else 'did not happen'} since {cond.since}"


__all__ = ["CLICK_KINDS", "MEMBER_ATTRIBUTES", "OPEN_KINDS", "PURCHASE_EVENTS", "InstanceView", "attribute_value",
           "evaluate", "event_happened", "exit_reason", "in_segment", "step_time", "unsubscribed"]
