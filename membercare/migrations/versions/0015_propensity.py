"""propensity: the decision log of channel and send-hour choices in the outbox

Every routed marketing row records the policy that chose its channel and send hour, the channel and local
hour it chose, and the probability with which it chose each (the propensity; 1 for a deterministic choice),
so that any other policy can be evaluated from the logs (membercare.optimise.offpolicy) and the learners can
weight by inverse propensity (membercare.optimise.causal). Nullable: rows planned before this revision, and
rows that were never routed (holdout, control, skipped), have no decision.

Revision ID: 0015_propensity
Revises: 0014_line_link
Create Date: 2026-12-05 22:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0015_propensity"
down_revision = "0014_line_link"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch_op:
        batch_op.add_column(sa.Column("policy", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("chosen_channel", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("channel_propensity", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("send_hour", sa.SmallInteger(), nullable=True))
        batch_op.add_column(sa.Column("hour_propensity", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch_op:
        for name in ("hour_propensity", "send_hour", "channel_propensity", "chosen_channel", "policy"):
            batch_op.drop_column(name)
