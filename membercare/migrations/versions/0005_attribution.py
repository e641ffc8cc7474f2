"""attribution: credited conversions and the SMS segment cache of the reports

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 10:00:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0005"
down_revision = "0004"
branch_labels = None
# Attribution reads outbox_messages (0003) as well as engagement_events (0004).
depends_on = ("0003",)

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, membercare.timeutil.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "attributions",
        sa.Column("id", ID, nullable=False),
        sa.Column("model", sa.String(length=16), nullable=False),
        sa.Column("conversion_type", sa.String(length=8), nullable=False),
        sa.Column("conversion_id", ID, nullable=False),
        sa.Column("order_id", ID, nullable=True),
        sa.Column("coupon_id", ID, nullable=True),
        sa.Column("member_id", ID, nullable=False),
        _ts("converted_at"),
        sa.Column("revenue_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("occurrence", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=True),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column("touch_kind", sa.String(length=16), nullable=False),
        _ts("touched_at"),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        _ts("computed_at"),
        sa.CheckConstraint("model IN ('last_touch', 'first_touch', 'holdout')", name="ck_attributions_model"),
        sa.CheckConstraint("conversion_type IN ('order', 'coupon')", name="ck_attributions_conversion_type"),
        sa.CheckConstraint("revenue_minor >= 0", name="ck_attributions_revenue_nonneg"),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"]),
        sa.ForeignKeyConstraint(["coupon_id"], ["coupons.id"]),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model", "conversion_type", "conversion_id", "message_id",
                            name="uq_attributions_conversion_message"),
    )
    with op.batch_alter_table("attributions", schema=None) as batch_op:
        batch_op.create_index("ix_attributions_model_converted", ["model", "converted_at"], unique=False)
        batch_op.create_index("ix_attributions_message", ["message_id"], unique=False)
        batch_op.create_index("ix_attributions_campaign", ["campaign", "converted_at"], unique=False)
    op.create_table(
        "sms_message_segments",
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("segments", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )


def downgrade() -> None:
    op.drop_table("sms_message_segments")
    with op.batch_alter_table("attributions", schema=None) as batch_op:
        batch_op.drop_index("ix_attributions_campaign")
        batch_op.drop_index("ix_attributions_message")
        batch_op.drop_index("ix_attributions_model_converted")
    op.drop_table("attributions")
