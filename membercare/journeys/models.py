"""Journey tables: per-member journey instances, the log of the steps they took, and member events.

* ``journey_instances``: one row per member per entry into a journey, with the current step and when it is
  due. The advancer (:mod:`.advance`) takes due rows in batches; nothing runs while a member waits.
  ``(journey, member_id, entry_key)`` is unique (the same entry event twice makes one instance) and so is
  ``(journey, active_key)``: ``active_key`` is the member id while the instance is active and NULL after, so a
  member is in a journey at most once at a time whatever the re-entry policy.
* ``journey_steps``: one row per step an instance went through, unique per ``(instance, step)`` (journeys
  never loop), written in the transaction that executes the step: the second guard of exactly once, beside
  the outbox key of a send.
* ``member_events``: what the shop tells us happened (cart updated, order placed, review written, custom
  events), stored once by ``event_id``; they start journeys and end waits for an event.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field

from membercare.models import ID, TableModel
from membercare.timeutil import UTCDateTime


class InstanceStatus(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    EXITED = "exited"
    HOLDOUT = "holdout"  # held out at entry (for lift): recorded, never advanced


def _in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(e.value) for e in enum)})"


def _ts(nullable: bool = False, index: bool = False):
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable, index=index)


class JourneyInstance(TableModel, table=True):
    __tablename__ = "journey_instances"
    __table_args__ = (
        sa.UniqueConstraint("journey", "member_id", "entry_key", name="uq_journey_instances_entry"),
        sa.UniqueConstraint("journey", "active_key", name="uq_journey_instances_active"),
        sa.CheckConstraint(_in("status", InstanceStatus), name="ck_journey_instances_status"),
        sa.Index("ix_journey_instances_due", "due_at"),
        sa.Index("ix_journey_instances_member", "member_id", "journey"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    journey: str = Field(max_length=64)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    entry_key: str = Field(max_length=200)
    active_key: int | None = Field(default=None, sa_type=ID, nullable=True)
    status: str = Field(max_length=16)
    step: str | None = Field(default=None, max_length=64)
    step_started_at: datetime | None = _ts(nullable=True)
    waiting_for: str | None = Field(default=None, max_length=64)
    due_at: datetime | None = _ts(nullable=True)
    entered_at: datetime = _ts()
    finished_at: datetime | None = _ts(nullable=True)
    exit_reason: str | None = Field(default=None, max_length=200)
    context: str = Field(default="{}", sa_type=sa.Text)
    claim_token: str | None = Field(default=None, max_length=32)
    claimed_at: datetime | None = _ts(nullable=True)
    updated_at: datetime = _ts()


class JourneyStep(TableModel, table=True):
    __tablename__ = "journey_steps"
    __table_args__ = (sa.UniqueConstraint("instance_id", "step", name="uq_journey_steps_once"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    instance_id: int = Field(foreign_key="journey_instances.id", sa_type=ID, nullable=False)
    journey: str = Field(max_length=64, index=True)
    step: str = Field(max_length=64)
    kind: str = Field(max_length=16)
    outcome: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=500)
    message_key: str | None = Field(default=None, max_length=255)
    at: datetime = _ts()


class MemberEvent(TableModel, table=True):
    __tablename__ = "member_events"
    __table_args__ = (sa.UniqueConstraint("event_id", name="uq_member_events_event_id"),
                      sa.Index("ix_member_events_member", "member_id", "name", "occurred_at"))

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    event_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    occurred_at: datetime = _ts()
    received_at: datetime = _ts()
    source: str = Field(default="api", max_length=16)
    properties: str = Field(default="{}", sa_type=sa.Text)


__all__ = ["InstanceStatus", "JourneyInstance", "JourneyStep", "MemberEvent"]
