"""engagement: the engagement_events ledger

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-23 12:00:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

KINDS = ("queued", "sent", "delivered", "deferred", "bounced", "rejected", "opened", "clicked", "complained",
         "unsubscribed", "resubscribed", "push_received", "push_opened", "push_dismissed", "failed", "inbound",
         "unknown")


def _in(column: str, values) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, membercare.timeutil.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "engagement_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("provider_event_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("bounce_class", sa.String(length=8), nullable=True),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("provider_message_id", sa.String(length=128), nullable=True),
        sa.Column("member_id", ID, nullable=True),
        _ts("occurred_at"),
        _ts("received_at"),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.CheckConstraint(_in("kind", KINDS), name="ck_engagement_events_kind"),
        sa.CheckConstraint(_in("channel", ("email", "sms", "push")), name="ck_engagement_events_channel"),
        sa.CheckConstraint(
            "bounce_class IS NULL OR " + _in("bounce_class", ("hard", "soft")), name="ck_engagement_events_bounce_class"
        ),
        sa.CheckConstraint("(kind = 'bounced') = (bounce_class IS NOT NULL)", name="ck_engagement_events_bounce"),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("provider", "provider_event_id", name="uq_engagement_events_provider_event"),
    )
    with op.batch_alter_table("engagement_events", schema=None) as batch_op:
        batch_op.create_index("ix_engagement_events_message", ["message_id"], unique=False)
        batch_op.create_index("ix_engagement_events_member_occurred", ["member_id", "occurred_at"], unique=False)
        batch_op.create_index("ix_engagement_events_kind_occurred", ["kind", "occurred_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("engagement_events", schema=None) as batch_op:
        batch_op.drop_index("ix_engagement_events_kind_occurred")
        batch_op.drop_index("ix_engagement_events_member_occurred")
        batch_op.drop_index("ix_engagement_events_message")
    op.drop_table("engagement_events")
