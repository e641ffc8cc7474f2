"""catalogue: a product's arrival date, stock on hand, and when it last came back in stock

All three are nullable: a shop that never sends them keeps working (unknown stock counts as available).
New-arrival and back-in-stock segments and recommendations read them (docs/campaigns.md).

Revision ID: 0013_catalogue
Revises: 0012_order_summary
Create Date: 2026-12-05 22:30:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0013_catalogue"
down_revision = "0012_order_summary"
branch_labels = None
depends_on = None


CHECK = "stock IS NULL OR stock >= 0"


def upgrade() -> None:
    ts = membercare.timeutil.UTCDateTime(timezone=True)
    # Plain ADD COLUMNs on both backends: batch mode would copy products on SQLite, and dropping the
    # original under PRAGMA foreign_keys=ON fails while order_lines refer to it.
    op.add_column("products", sa.Column("arrived_at", ts, nullable=True))
    op.add_column("products", sa.Column("restocked_at", ts, nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE products ADD COLUMN stock INTEGER CONSTRAINT ck_products_stock_nonneg CHECK ({CHECK})")
    else:
        op.add_column("products", sa.Column("stock", sa.Integer(), nullable=True))
        op.create_check_constraint("ck_products_stock_nonneg", "products", CHECK)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite 3.35+ drops a column (and its own CHECK) in place.
        for col in ("stock", "restocked_at", "arrived_at"):
            op.execute(f"ALTER TABLE products DROP COLUMN {col}")
    else:
        op.drop_constraint("ck_products_stock_nonneg", "products", type_="check")
        for col in ("stock", "restocked_at", "arrived_at"):
            op.drop_column("products", col)
