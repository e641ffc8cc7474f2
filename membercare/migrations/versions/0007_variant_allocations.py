"""variant allocations: the template-variant shares of each campaign occurrence, and promoted winners

The shares of an occurrence are computed once (uniform at first, then by the Thompson-sampling bandit)
and stored here, so that reruns and parallel planning give every member the same variant.

Revision ID: 0007_variants
Revises: 0006
Create Date: 2026-11-23 12:30:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0007_variants"
down_revision = "0006"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "variant_allocations",
        sa.Column("id", ID, nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("occurrence", sa.String(length=64), nullable=False),
        sa.Column("as_of", membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.Column("goal", sa.String(length=16), nullable=False),
        sa.Column("names", sa.String(length=200), nullable=False),
        sa.Column("shares", sa.Text(), nullable=False),
        sa.Column("winner", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
        sa.Column("created_at", membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign", "occurrence", name="uq_variant_allocations_occurrence"),
    )
    op.create_index("ix_variant_allocations_campaign_as_of", "variant_allocations", ["campaign", "as_of"])


def downgrade() -> None:
    op.drop_index("ix_variant_allocations_campaign_as_of", table_name="variant_allocations")
    op.drop_table("variant_allocations")
