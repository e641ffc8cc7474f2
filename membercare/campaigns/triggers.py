"""Event triggers: the campaigns an event (order delivered, bad review, ...) starts for one member.

Campaigns with a ``trigger:`` instead of a segment are started by events. :func:`plan_trigger` turns an
event for one member into the runs to start (one per campaign the event triggers), each with an explicit
one-member audience and an occurrence key taken from the due date or the event reference, so that the daily
sweep of the same campaign and the trigger never both send (see :mod:`.occurrence`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.campaigns.definition import DEFAULT_VALID_FOR_DAYS, Trigger, list_campaigns, load_campaign
from membercare.campaigns.occurrence import RunOptions
from membercare.config import Settings
from membercare.errors import InputError, UnknownNameError
from membercare.models import Member, Order
from membercare.timeutil import ensure_utc, utcnow

# Events that start the same campaigns as another event. Post-purchase care counts its delay from the
# order's delivery; a shipping event is accepted too (the due date then uses delivered_at once it is known).
EVENT_ALIASES: dict[str, str] = {"order.shipped": "order.delivered"}


def trigger_events(settings: Settings) -> dict[str, list[str]]:
    """Event name -> campaigns started by it (from the campaigns' ``trigger:``), aliases included."""
    events: dict[str, list[str]] = defaultdict(list)
    for camp in list_campaigns(settings):
        # A journey's messages (trigger "journey.<journey>") are sent by the journey's steps only.
        if camp.trigger is not None and not camp.trigger.event.startswith("journey."):
            events[camp.trigger.event].append(camp.name)
    for alias, target in EVENT_ALIASES.items():
        if target in events:
            events.setdefault(alias, list(events[target]))
    return dict(events)


@dataclass(frozen=True)
class TriggeredRun:
    """One campaign to run for one member because of an event; ``due_at`` in the future means not yet."""

    campaign: str
    member_id: int
    options: RunOptions
    due_at: datetime
    expired: str | None = None  # why the message is no longer sent (its validity window has passed)


def find_member(conn: Connection, member: str | int) -> int:
    """A member by external id (``M0000042``) or database id (``42``)."""
    m = Member.__table__
    text = str(member).strip()
    mid = conn.execute(sa.select(m.c.id).where(m.c.external_id == text)).scalar()
    if mid is None and text.isdigit():
        mid = conn.execute(sa.select(m.c.id).where(m.c.id == int(text))).scalar()
    if mid is None:
        raise InputError(f"no member {text!r} (give the external id or the database id)")
    return int(mid)


def plan_trigger(engine: Engine, settings: Settings, event: str, member: str | int, *, order: str | None = None,
                 ref: str | None = None, at: datetime | None = None) -> list[TriggeredRun]:
    """The runs an event starts for one member (one per campaign triggered by ``event``).

    ``at`` is when the event happened (default now). A campaign with ``delay_days`` is due that many days
    later, counted from the order's delivery for order events; the occurrence key is taken from the due
    date, so the daily sweep of the same campaign and this trigger share it (never both send). A message
    whose due time lies more than the trigger's ``valid_for_days`` before ``at`` is ``expired`` (with the
    reason): callers skip it rather than send a stale "7 days after delivery" message at once.
    """
    events = trigger_events(settings)
    if event not in events:
        raise UnknownNameError("event", event, events)
    at = ensure_utc(at) if at is not None else utcnow()
    with engine.connect() as conn:
        member_id = find_member(conn, member)
        order_row = None
        if order is not None:
            o = Order.__table__
            order_row = conn.execute(sa.select(o.c.external_id, o.c.member_id, o.c.delivered_at, o.c.status)
                                     .where(o.c.external_id == str(order))).first()
            if order_row is None or order_row.member_id != member_id:
                raise InputError(f"member {member} has no order {order!r}")
    out = []
    for name in events[event]:
        camp = load_campaign(name, settings)
        if camp.message_per == "order" and order_row is None:
            raise InputError(f"campaign {name} is about an order: give --order")
        base = (order_row.delivered_at if order_row is not None and order_row.delivered_at else at)
        due = base + timedelta(days=camp.trigger.delay_days if camp.trigger else 0)
        opts = RunOptions(as_of=max(due, at), members=(member_id,),
                          order_ref=order_row.external_id if order_row is not None else None,
                          event_ref=ref or (f"{event}-{order_row.external_id}" if order_row is not None else None),
                          occurrence_at=due)
        out.append(TriggeredRun(name, member_id, opts, due, _expired(camp.trigger, due, at)))
    return out


def _expired(trigger: Trigger | None, due: datetime, at: datetime) -> str | None:
    window = timedelta(days=trigger.valid_for_days if trigger else DEFAULT_VALID_FOR_DAYS)
    late = at - due
    if late <= window:
        return None
    return (f"expired: due {due.date().isoformat()}, {late.days} days before the event was reported; the message "
            f"is valid for {window.days} days after it is due (valid_for_days)")


__all__ = ["EVENT_ALIASES", "TriggeredRun", "find_member", "plan_trigger", "trigger_events"]
