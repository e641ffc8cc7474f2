"""foundation: members, consent, devices, catalogue, orders, coupons, tiers, points

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:01:47.143946
"""
import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import membercare.timeutil

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('import_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('source_name', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('started_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
    sa.Column('rows_total', sa.Integer(), nullable=False),
    sa.Column('rows_inserted', sa.Integer(), nullable=False),
    sa.Column('rows_updated', sa.Integer(), nullable=False),
    sa.Column('rows_unchanged', sa.Integer(), nullable=False),
    sa.Column('rows_rejected', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('members',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('external_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('email', sqlmodel.sql.sqltypes.AutoString(length=254), nullable=True),
    sa.Column('phone', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True),
    sa.Column('country', sqlmodel.sql.sqltypes.AutoString(length=2), nullable=False),
    sa.Column('locale', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('timezone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('birthday', sa.Date(), nullable=True),
    sa.Column('age_group', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('region', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('city', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('joined_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('tier', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('points_balance', sa.Integer(), nullable=False),
    sa.Column('preferred_channels', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("phone IS NULL OR phone LIKE '+%'", name='ck_members_phone_e164'),
    sa.CheckConstraint('points_balance >= 0', name='ck_members_points_nonneg'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('external_id')
    )
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_members_email'), ['email'], unique=False)
        batch_op.create_index(batch_op.f('ix_members_joined_at'), ['joined_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_members_region'), ['region'], unique=False)
        batch_op.create_index(batch_op.f('ix_members_tier'), ['tier'], unique=False)

    op.create_table('products',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sku', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('price_minor', sa.BigInteger(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.CheckConstraint('price_minor >= 0', name='ck_products_price_nonneg'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sku')
    )
    with op.batch_alter_table('products', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_products_category'), ['category'], unique=False)

    op.create_table('tiers',
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('upgrade_spend_minor', sa.BigInteger(), nullable=False),
    sa.Column('upgrade_orders', sa.Integer(), nullable=False),
    sa.Column('renewal_spend_minor', sa.BigInteger(), nullable=False),
    sa.Column('renewal_orders', sa.Integer(), nullable=False),
    sa.Column('window_days', sa.Integer(), nullable=False),
    sa.Column('points_per_100', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('code'),
    sa.UniqueConstraint('rank')
    )
    op.create_table('consent_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('granted', sa.Boolean(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('occurred_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('recorded_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
    sa.CheckConstraint("channel IN ('email', 'sms', 'push')", name='ck_consent_events_channel'),
    sa.CheckConstraint("purpose IN ('transactional', 'marketing')", name='ck_consent_events_purpose'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('member_id', 'channel', 'purpose', 'occurred_at', 'granted', name='uq_consent_events_statement')
    )
    with op.batch_alter_table('consent_events', schema=None) as batch_op:
        batch_op.create_index('ix_consent_events_member', ['member_id', 'occurred_at'], unique=False)

    op.create_table('consents',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('granted', sa.Boolean(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('changed_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("channel IN ('email', 'sms', 'push')", name='ck_consents_channel'),
    sa.CheckConstraint("purpose IN ('transactional', 'marketing')", name='ck_consents_purpose'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('member_id', 'channel', 'purpose', name='uq_consents_member_channel_purpose')
    )
    op.create_table('devices',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('token', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('platform', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('app_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('invalidated_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
    sa.Column('invalid_reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.CheckConstraint("platform IN ('ios', 'android', 'web')", name='ck_devices_platform'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token')
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_devices_member_id'), ['member_id'], unique=False)

    op.create_table('orders',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('external_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('placed_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('total_minor', sa.BigInteger(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('delivered_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
    sa.Column('updated_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('placed', 'paid', 'shipped', 'delivered', 'cancelled', 'refunded')",
                       name='ck_orders_status'),
    sa.CheckConstraint('total_minor >= 0', name='ck_orders_total_nonneg'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('external_id')
    )
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index('ix_orders_member_placed', ['member_id', 'placed_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_placed_at'), ['placed_at'], unique=False)

    op.create_table('tier_history',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tier', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('previous_tier', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('valid_from', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('valid_to', membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
    sa.Column('decided_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
    sa.CheckConstraint("reason IN ('initial', 'import', 'upgrade', 'renewal', 'downgrade', 'manual')",
                       name='ck_tier_history_reason'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.ForeignKeyConstraint(['tier'], ['tiers.code'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('member_id', 'valid_from', name='uq_tier_history_member_from')
    )
    with op.batch_alter_table('tier_history', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tier_history_member_id'), ['member_id'], unique=False)

    op.create_table('coupons',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=True),
    sa.Column('percent_off', sa.Integer(), nullable=True),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('min_spend_minor', sa.BigInteger(), nullable=False),
    sa.Column('issued_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('redeemed_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
    sa.Column('redeemed_order_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('campaign', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.CheckConstraint("(kind = 'amount' AND amount_minor > 0 AND percent_off IS NULL) OR "
                       "(kind = 'percent' AND percent_off > 0 AND percent_off <= 100 AND amount_minor IS NULL)",
                       name='ck_coupons_value'),
    sa.CheckConstraint("kind IN ('amount', 'percent')", name='ck_coupons_kind'),
    sa.CheckConstraint('expires_at > issued_at', name='ck_coupons_expiry_after_issue'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.ForeignKeyConstraint(['redeemed_order_id'], ['orders.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('code')
    )
    with op.batch_alter_table('coupons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_coupons_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index('ix_coupons_member_expires', ['member_id', 'expires_at'], unique=False)

    op.create_table('order_lines',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('order_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('line_no', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('sku', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('quantity', sa.Integer(), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.CheckConstraint('amount_minor >= 0', name='ck_order_lines_amount_nonneg'),
    sa.CheckConstraint('quantity > 0', name='ck_order_lines_quantity_pos'),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('order_id', 'line_no', name='uq_order_lines_order_line')
    )
    with op.batch_alter_table('order_lines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_order_lines_category'), ['category'], unique=False)
        batch_op.create_index(batch_op.f('ix_order_lines_order_id'), ['order_id'], unique=False)

    op.create_table('points_ledger',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('member_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.Column('occurred_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
    sa.Column('order_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('dedupe_key', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('note', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.CheckConstraint("(kind = 'earned' AND points > 0) OR (kind IN ('spent', 'expired') AND points < 0) "
                       "OR kind = 'adjusted'", name='ck_points_sign'),
    sa.CheckConstraint("kind IN ('earned', 'spent', 'expired', 'adjusted')", name='ck_points_kind'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], ),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedupe_key')
    )
    with op.batch_alter_table('points_ledger', schema=None) as batch_op:
        batch_op.create_index('ix_points_member_occurred', ['member_id', 'occurred_at'], unique=False)

    # ### end Alembic commands ###
    # Seed the default tier ladder (silver/gold/platinum); shops edit the rows, not the code.
    from membercare.models import DEFAULT_TIERS

    tiers = sa.table(
        "tiers", sa.column("code", sa.String), sa.column("name", sa.String), sa.column("rank", sa.Integer),
        sa.column("upgrade_spend_minor", sa.BigInteger), sa.column("upgrade_orders", sa.Integer),
        sa.column("renewal_spend_minor", sa.BigInteger), sa.column("renewal_orders", sa.Integer),
        sa.column("window_days", sa.Integer), sa.column("points_per_100", sa.Integer),
    )
    op.bulk_insert(tiers, [dict(t) for t in DEFAULT_TIERS])


def downgrade() -> None:
    with op.batch_alter_table('points_ledger', schema=None) as batch_op:
        batch_op.drop_index('ix_points_member_occurred')

    op.drop_table('points_ledger')
    with op.batch_alter_table('order_lines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_order_lines_order_id'))
        batch_op.drop_index(batch_op.f('ix_order_lines_category'))

    op.drop_table('order_lines')
    with op.batch_alter_table('coupons', schema=None) as batch_op:
        batch_op.drop_index('ix_coupons_member_expires')
        batch_op.drop_index(batch_op.f('ix_coupons_expires_at'))

    op.drop_table('coupons')
    with op.batch_alter_table('tier_history', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tier_history_member_id'))

    op.drop_table('tier_history')
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_orders_placed_at'))
        batch_op.drop_index('ix_orders_member_placed')

    op.drop_table('orders')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_member_id'))

    op.drop_table('devices')
    op.drop_table('consents')
    with op.batch_alter_table('consent_events', schema=None) as batch_op:
        batch_op.drop_index('ix_consent_events_member')

    op.drop_table('consent_events')
    op.drop_table('tiers')
    with op.batch_alter_table('products', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_products_category'))

    op.drop_table('products')
    with op.batch_alter_table('members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_members_tier'))
        batch_op.drop_index(batch_op.f('ix_members_region'))
        batch_op.drop_index(batch_op.f('ix_members_joined_at'))
        batch_op.drop_index(batch_op.f('ix_members_email'))

    op.drop_table('members')
    op.drop_table('import_runs')
    # ### end Alembic commands ###
