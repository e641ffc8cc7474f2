"""journeys: per-member journey instances, their step log, and member events

``journey_instances`` holds one row per member per entry into a journey with its current step and due time
(the advancer takes due rows in batches); ``journey_steps`` logs each step once per instance (unique);
``member_events`` stores the shop's events once by ``event_id`` (they start journeys and end waits).

Revision ID: 0009_journeys
Revises: 0008_send_gate
Create Date: 2026-12-05 00:40:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0009_journeys"
down_revision = "0008_send_gate"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, membercare.timeutil.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "journey_instances",
        sa.Column("id", ID, nullable=False),
        sa.Column("journey", sa.String(length=64), nullable=False),
        sa.Column("member_id", ID, nullable=False),
        sa.Column("entry_key", sa.String(length=200), nullable=False),
        sa.Column("active_key", ID, nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=True),
        _ts("step_started_at", True),
        sa.Column("waiting_for", sa.String(length=64), nullable=True),
        _ts("due_at", True),
        _ts("entered_at"),
        _ts("finished_at", True),
        sa.Column("exit_reason", sa.String(length=200), nullable=True),
        sa.Column("context", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        _ts("claimed_at", True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.UniqueConstraint("journey", "member_id", "entry_key", name="uq_journey_instances_entry"),
        sa.UniqueConstraint("journey", "active_key", name="uq_journey_instances_active"),
        sa.CheckConstraint("status IN ('active', 'completed', 'exited', 'holdout')",
                           name="ck_journey_instances_status"),
    )
    op.create_index("ix_journey_instances_due", "journey_instances", ["due_at"])
    op.create_index("ix_journey_instances_member", "journey_instances", ["member_id", "journey"])
    op.create_table(
        "journey_steps",
        sa.Column("id", ID, nullable=False),
        sa.Column("instance_id", ID, nullable=False),
        sa.Column("journey", sa.String(length=64), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("message_key", sa.String(length=255), nullable=True),
        _ts("at"),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["instance_id"], ["journey_instances.id"]),
        sa.UniqueConstraint("instance_id", "step", name="uq_journey_steps_once"),
    )
    op.create_index("ix_journey_steps_journey", "journey_steps", ["journey"])
    op.create_table(
        "member_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("member_id", ID, nullable=False),
        _ts("occurred_at"),
        _ts("received_at"),
        sa.Column("source", sa.String(length=16), nullable=False, server_default="api"),
        sa.Column("properties", sa.Text(), nullable=False, server_default="{}"),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.UniqueConstraint("event_id", name="uq_member_events_event_id"),
    )
    op.create_index("ix_member_events_member", "member_events", ["member_id", "name", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_member_events_member", table_name="member_events")
    op.drop_table("member_events")
    op.drop_index("ix_journey_steps_journey", table_name="journey_steps")
    op.drop_table("journey_steps")
    op.drop_index("ix_journey_instances_member", table_name="journey_instances")
    op.drop_index("ix_journey_instances_due", table_name="journey_instances")
    op.drop_table("journey_instances")
