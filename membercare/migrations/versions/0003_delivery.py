"""delivery: campaign runs, outbox ledger, suppressions, delivery policies

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-23 10:00:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, membercare.timeutil.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "campaign_runs",
        sa.Column("id", ID, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("occurrence", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        _ts("as_of"),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_budget", sa.Float(), nullable=False),
        sa.Column("status_reason", sa.String(length=500), nullable=True),
        sa.Column("counts", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
        sa.CheckConstraint(
            "status IN ('planned', 'dispatching', 'paused', 'completed', 'failed')", name="ck_campaign_runs_status"
        ),
        sa.CheckConstraint("purpose IN ('transactional', 'marketing')", name="ck_campaign_runs_purpose"),
        sa.CheckConstraint("error_budget > 0 AND error_budget <= 1", name="ck_campaign_runs_error_budget"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign", "occurrence", name="uq_campaign_runs_occurrence"),
    )
    op.create_table(
        "outbox_messages",
        sa.Column("id", ID, nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("occurrence", sa.String(length=64), nullable=False),
        sa.Column("member_id", ID, nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("coupon_code", sa.String(length=64), nullable=True),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=True),
        sa.Column("fallback_channels", sa.String(length=32), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason_code", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("transient_failures", sa.Integer(), nullable=False),
        _ts("scheduled_at"),
        _ts("next_attempt_at", nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("provider_message_id", sa.String(length=128), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        _ts("claimed_at", nullable=True),
        _ts("sent_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint(
            "state IN ('planned', 'sending', 'sent', 'deferred', 'failed', 'suppressed', 'skipped', 'unknown')",
            name="ck_outbox_state",
        ),
        sa.CheckConstraint("purpose IN ('transactional', 'marketing')", name="ck_outbox_purpose"),
        sa.CheckConstraint("channel IS NULL OR channel IN ('email', 'sms', 'push')", name="ck_outbox_channel"),
        sa.ForeignKeyConstraint(["run_id"], ["campaign_runs.id"]),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_claim", ["run_id", "state", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_outbox_member_scheduled", ["member_id", "scheduled_at"], unique=False)

    op.create_table(
        "suppressions",
        sa.Column("id", ID, nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("address_hash", sa.String(length=64), nullable=True),
        sa.Column("member_id", ID, nullable=True),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint(
            "reason IN ('hard_bounce', 'complaint', 'unsubscribe', 'invalid', 'manual')", name="ck_suppressions_reason"
        ),
        sa.CheckConstraint("channel IN ('email', 'sms', 'push', 'any')", name="ck_suppressions_channel"),
        sa.CheckConstraint("(address_hash IS NULL) <> (member_id IS NULL)", name="ck_suppressions_target"),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("channel", "address_hash", name="uq_suppressions_address"),
        sa.UniqueConstraint("channel", "member_id", name="uq_suppressions_member"),
    )
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.create_index("ix_suppressions_member", ["member_id"], unique=False)

    op.create_table(
        "delivery_policies",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("delivery_policies")
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_index("ix_suppressions_member")
    op.drop_table("suppressions")
    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_member_scheduled")
        batch_op.drop_index("ix_outbox_claim")
    op.drop_table("outbox_messages")
    op.drop_table("campaign_runs")
