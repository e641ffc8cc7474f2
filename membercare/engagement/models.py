"""The engagement ledger: every provider event we accepted, once.

``engagement_events`` is append-only. ``(provider, provider_event_id)`` is unique: ``provider_event_id``
is the provider's own event id where it has one (SendGrid ``sg_event_id``) and otherwise a key derived
from what identifies the event (Twilio ``MessageSid:MessageStatus``, inbound ``MessageSid``, a hash of
an app report), so a webhook delivered twice is stored once and its effects run once.

``message_id`` is ours (the outbox row's public id); ``member_id`` is resolved on arrival where
possible (outbox row, else the address), so that reports and attribution join without the raw payload.
``raw`` keeps the provider's payload as JSON text: it may hold the recipient's address, so its
retention is the privacy policy's business (see docs/engagement.md).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field

from membercare.engagement.events import BounceClass, EventKind
from membercare.models import ID, Channel, TableModel
from membercare.timeutil import UTCDateTime, utcnow


def _in(column: str, values) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class EngagementEventRow(TableModel, table=True):
    __tablename__ = "engagement_events"
    __table_args__ = (
        sa.UniqueConstraint("provider", "provider_event_id", name="uq_engagement_events_provider_event"),
        sa.CheckConstraint(_in("kind", EventKind), name="ck_engagement_events_kind"),
        sa.CheckConstraint(_in("channel", Channel), name="ck_engagement_events_channel"),
        sa.CheckConstraint(f"bounce_class IS NULL OR {_in('bounce_class', BounceClass)}",
                           name="ck_engagement_events_bounce_class"),
        sa.CheckConstraint("(kind = 'bounced') = (bounce_class IS NOT NULL)", name="ck_engagement_events_bounce"),
        sa.Index("ix_engagement_events_message", "message_id"),
        sa.Index("ix_engagement_events_member_occurred", "member_id", "occurred_at"),
        sa.Index("ix_engagement_events_kind_occurred", "kind", "occurred_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    provider: str = Field(max_length=16)
    provider_event_id: str = Field(max_length=128, description="dedupe key, unique per provider")
    kind: str = Field(max_length=16)
    bounce_class: str | None = Field(default=None, max_length=8)
    channel: str = Field(max_length=8)
    message_id: str | None = Field(default=None, max_length=32, description="our outbox message id")
    provider_message_id: str | None = Field(default=None, max_length=128)
    member_id: int | None = Field(default=None, foreign_key="members.id", sa_type=ID)
    occurred_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    received_at: datetime = Field(sa_type=UTCDateTime, nullable=False, default_factory=utcnow)
    url: str | None = Field(default=None, sa_type=sa.Text)
    reason: str | None = Field(default=None, max_length=500)
    raw: str = Field(sa_type=sa.Text, description="the provider's payload, JSON")
