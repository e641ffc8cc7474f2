"""Members entering a journey: the re-entry policy, the holdout at entry, and waking instances on events.

An entry is one ``INSERT ... ON CONFLICT DO NOTHING`` into ``journey_instances``; the two unique constraints
carry the policy, so concurrent entries (two receivers, an import beside the API) cannot double an instance:

* ``(journey, member_id, entry_key)``: the same entry (one event id, or ``once`` for ``reentry: never``)
  makes one instance, however often it is delivered;
* ``(journey, active_key)``: ``active_key`` is the member id while the instance is active, so a member is in
  a journey once at a time (``reentry: after_exit`` enters again only after the previous instance ended).

Held-out members (``holdout`` of the journey, stable per member: ``membercare.optimise.assignment``) get an
instance in status ``holdout`` that never advances: the control group for the journey's lift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.db import insert_for
from membercare.delivery.models import OutboxMessage
from membercare.engagement.models import EngagementEventRow
from membercare.journeys.conditions import OPEN_KINDS, PURCHASE_EVENTS
from membercare.journeys.definition import Journey
from membercare.journeys.models import InstanceStatus, JourneyInstance
from membercare.optimise.assignment import in_holdout
from membercare.timeutil import ensure_utc
from segments.base import context as segment_context
from segments.base import ref as segment_ref

ONCE = "once"


def holdout_domain(journey: Journey) -> str:
    return f"journey_{journey.name}"


def enter(conn: Connection, journey: Journey, member_id: int, *, entry_key: str, at: datetime,
          context: Mapping[str, Any] | None = None) -> int | None:
    """Enter ``member_id`` into ``journey`` at ``at``; the new instance's id, or None when the policy says no."""
    at = ensure_utc(at)
    held = journey.holdout > 0 and in_holdout(member_id, holdout_domain(journey), journey.holdout)
    row = dict(journey=journey.name, member_id=member_id, entry_key=ONCE if journey.reentry == "never" else entry_key,
               active_key=None if held else member_id,
               status=(InstanceStatus.HOLDOUT if held else InstanceStatus.ACTIVE).value,
               step=None if held else journey.steps[0].id, step_started_at=None, waiting_for=None,
               due_at=None if held else at, entered_at=at, finished_at=at if held else None,
               exit_reason="holdout" if held else None,
               context=json.dumps(dict(context or {}), ensure_ascii=False, sort_keys=True, default=str)[:20_000],
               updated_at=at)
    t = JourneyInstance.__table__
    return conn.execute(insert_for(conn, t).values(**row).on_conflict_do_nothing().returning(t.c.id)).scalar()


def enter_from_segment(conn: Connection, journey: Journey, now: datetime, shop_timezone: str) -> int:
    """Enter the members of the journey's entry segment at ``now`` (its SQL, streamed); how many entered.

    The entry key is the shop-local date (``once`` under ``reentry: never``): run several times a day, a
    member enters once that day, and only when not already in the journey.
    """
    seg = journey.entry.segment
    if seg is None:
        return 0
    day = now.astimezone(ZoneInfo(shop_timezone)).date().isoformat()
    q = segment_ref(seg.name, **seg.params).select(segment_context(conn, now, shop_timezone)).subquery()
    ids = list(conn.execute(sa.select(q.c.member_id).distinct()).scalars())
    return sum(1 for mid in ids if enter(conn, journey, int(mid), entry_key=f"seg:{day}", at=now) is not None)


def wake_waiting(conn: Connection, member_id: int, names: Sequence[str], now: datetime) -> int:
    """Make the member's instances that wait for one of ``names`` due now (they check the event when advanced)."""
    waits = set(names)
    if waits & set(PURCHASE_EVENTS):
        waits.add("purchased")
    t = JourneyInstance.__table__
    return conn.execute(sa.update(t).where(t.c.member_id == member_id, t.c.status == InstanceStatus.ACTIVE.value,
                                           t.c.waiting_for.in_(sorted(waits)), t.c.due_at > now)
                        .values(due_at=now)).rowcount or 0


def wake_engaged(conn: Connection, now: datetime, window: timedelta) -> int:
    """Make instances waiting for ``opened``/``clicked`` due now when one of their messages got such an
    engagement event in the last ``window`` (the receiver stores those; the instance checks them itself).

    Starts from the recent events (``ix_engagement_events_kind_occurred``) and their outbox rows; the instance
    is the ``|@<id>`` suffix of a journey message's idempotency key. A wake is harmless: an instance whose
    event does not count (before its wait began) goes back to waiting for its timeout.
    """
    ev, ob, t = EngagementEventRow.__table__, OutboxMessage.__table__, JourneyInstance.__table__
    keys = conn.execute(sa.select(ob.c.idempotency_key).join(ev, ev.c.message_id == ob.c.message_id)
                        .where(ev.c.kind.in_(OPEN_KINDS), ev.c.occurred_at > now - window,
                               ob.c.idempotency_key.like("%|@%"))).scalars()
    ids = sorted({int(k.rsplit("|@", 1)[1]) for k in keys if k.rsplit("|@", 1)[1].isdigit()})
    woken = 0
    for i in range(0, len(ids), 5000):
        woken += conn.execute(sa.update(t).where(t.c.id.in_(ids[i:i + 5000]), t.c.status == InstanceStatus.ACTIVE.value,
                                                 t.c.waiting_for.in_(("opened", "clicked")), t.c.due_at > now)
                              .values(due_at=now)).rowcount or 0
    return woken


__all__ = ["ONCE", "enter", "enter_from_segment", "holdout_domain", "wake_engaged", "wake_waiting"]
