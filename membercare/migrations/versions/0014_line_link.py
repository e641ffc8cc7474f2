"""LINE account link: the single-use nonces of the account-link flow

``line_link_nonces`` holds one row per nonce the receiver minted for a member who logged in to the shop
(see membercare/receiver/line_link.py): the SHA-256 of the nonce (the nonce itself is never stored, so a
copy of the table cannot complete anybody's link), the member, when it expires, and once LINE's
``accountLink`` event spent it, when and for which LINE user id (``used_at`` set exactly once: the
consuming UPDATE requires it to be NULL).

Revision ID: 0014_line_link
Revises: 0013_catalogue
Create Date: 2026-12-05 22:30:00
"""
import sqlalchemy as sa
from alembic import op

from membercare.timeutil import UTCDateTime

revision = "0014_line_link"
down_revision = "0013_catalogue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "line_link_nonces",
        sa.Column("nonce_hash", sa.String(length=64), primary_key=True),
        sa.Column("member_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("members.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("used_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("line_user_id", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
    )
    op.create_index("ix_line_link_nonces_expires_at", "line_link_nonces", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_line_link_nonces_expires_at", table_name="line_link_nonces")
    op.drop_table("line_link_nonces")
