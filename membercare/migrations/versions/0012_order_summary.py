"""order summary: one row per member folding their purchases, kept current by triggers on orders

Segments and RFM scoring read it instead of aggregating every order (see membercare/order_summary.py
and segments/summary.py). The triggers come from membercare.order_summary so that they and its
``rebuild`` share one definition; existing orders are folded in here (backfill).

Revision ID: 0012_order_summary
Revises: 0010_line
Create Date: 2026-12-05 01:00:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil
from membercare import order_summary

revision = "0012_order_summary"
down_revision = "0010_line"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = membercare.timeutil.UTCDateTime(timezone=True)
    op.create_table(
        "order_summary",
        sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False,
                  nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("spend_minor", sa.BigInteger(), nullable=False),
        sa.Column("first_purchase_at", ts, nullable=True),
        sa.Column("last_purchase_at", ts, nullable=True),
        sa.Column("first_purchase_days", sa.Float(), nullable=True),
        sa.Column("last_purchase_days", sa.Float(), nullable=True),
        sa.Column("changed_at", ts, nullable=False),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"]),
        sa.PrimaryKeyConstraint("member_id"),
    )
    op.create_index("ix_order_summary_changed_at", "order_summary", ["changed_at"], unique=False)
    # Holds a row only inside a bulk writer's transaction (order_summary.deferred_fold).
    op.create_table(order_summary.DEFERRED, sa.Column("id", sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint("id"))
    dialect = op.get_bind().dialect.name
    # Backfill before the triggers exist (one set-based pass), then hand over to the triggers.
    op.execute(f"INSERT INTO order_summary ({', '.join(order_summary.COLUMNS)}) "
               f"{order_summary.aggregate_sql(dialect, 'true')}")
    for stmt in order_summary.install_triggers_sql(dialect):
        op.execute(stmt)


def downgrade() -> None:
    for stmt in order_summary.drop_triggers_sql(op.get_bind().dialect.name):
        op.execute(stmt)
    op.drop_table(order_summary.DEFERRED)
    op.drop_index("ix_order_summary_changed_at", table_name="order_summary")
    op.drop_table("order_summary")
