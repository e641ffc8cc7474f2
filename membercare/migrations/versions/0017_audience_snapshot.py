"""audience snapshots: a run's segment audience written once, set-based, and read back in keyset pages

The flow process then holds a snapshot name and page bounds instead of every member key, so its memory
does not grow with the audience (see membercare/campaigns/audience.py). Rows live for one run; a run
that died leaves its rows to the next resolve's sweep.

Revision ID: 0017_audience_snapshot
Revises: 0016_cancelled
Create Date: 2026-12-05 22:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0017_audience_snapshot"
down_revision = "0016_cancelled"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audience_snapshots",
        sa.Column("snapshot", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("coupon_codes", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("snapshot", "seq"),
    )


def downgrade() -> None:
    op.drop_table("audience_snapshots")
