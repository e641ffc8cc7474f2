"""merge the scoring, delivery and engagement branches; index member lookups by phone and email

Inbound SMS (STOP/START) and email events without our message id resolve the member by address;
without these indexes each such event scanned the members table.

Revision ID: 0006
Revises: 0002, 0005 (and 0003 through 0005)
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = ("0002", "0005")  # 0003 is reached through 0005 (depends_on)
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_members_phone", "members", ["phone"])
    op.create_index("ix_members_email_lower", "members", [sa.text("lower(email)")])


def downgrade() -> None:
    op.drop_index("ix_members_email_lower", table_name="members")
    op.drop_index("ix_members_phone", table_name="members")
