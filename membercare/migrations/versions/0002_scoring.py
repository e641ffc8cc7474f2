"""scoring: rfm_scores, churn_model_fits, churn_scores; covering indexes for segment queries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:30:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
CELLS = ('champions', 'loyal', 'potential_loyalist', 'new', 'promising', 'need_attention', 'about_to_sleep',
         'at_risk', 'cannot_lose', 'hibernating', 'lost')


def upgrade() -> None:
    op.create_table('rfm_scores',
    sa.Column('member_id', ID, nullable=False),
    sa.Column('as_of_date', sa.Date(), nullable=False),
    sa.Column('last_purchase_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('recency_days', sa.Integer(), nullable=False),
    sa.Column('frequency', sa.Integer(), nullable=False),
    sa.Column('monetary_minor', sa.BigInteger(), nullable=False),
    sa.Column('r_score', sa.Integer(), nullable=False),
    sa.Column('f_score', sa.Integer(), nullable=False),
    sa.Column('m_score', sa.Integer(), nullable=False),
    sa.Column('cell', sa.String(length=24), nullable=False),
    sa.CheckConstraint('r_score BETWEEN 1 AND 5 AND f_score BETWEEN 1 AND 5 AND m_score BETWEEN 1 AND 5',
                       name='ck_rfm_scores_range'),
    sa.CheckConstraint('cell IN (' + ', '.join(repr(c) for c in CELLS) + ')', name='ck_rfm_scores_cell'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id']),
    sa.PrimaryKeyConstraint('member_id', 'as_of_date'),
    )
    op.create_index('ix_rfm_scores_date_cell', 'rfm_scores', ['as_of_date', 'cell'])

    op.create_table('churn_model_fits',
    sa.Column('id', ID, nullable=False),
    sa.Column('as_of_date', sa.Date(), nullable=False),
    sa.Column('calibration_end', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('fitted_at', membercare.timeutil.UTCDateTime(timezone=True), nullable=False),
    sa.Column('r', sa.Float(), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('a', sa.Float(), nullable=False),
    sa.Column('b', sa.Float(), nullable=False),
    sa.Column('log_likelihood', sa.Float(), nullable=False),
    sa.Column('customers', sa.Integer(), nullable=False),
    sa.Column('converged', sa.Boolean(), nullable=False),
    sa.Column('horizon_days', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('as_of_date'),
    )

    op.create_table('churn_scores',
    sa.Column('member_id', ID, nullable=False),
    sa.Column('as_of_date', sa.Date(), nullable=False),
    sa.Column('fit_id', ID, nullable=False),
    sa.Column('frequency', sa.Integer(), nullable=False),
    sa.Column('recency_days', sa.Integer(), nullable=False),
    sa.Column('age_days', sa.Integer(), nullable=False),
    sa.Column('p_alive', sa.Float(), nullable=False),
    sa.Column('expected_purchases', sa.Float(), nullable=False),
    sa.CheckConstraint('p_alive >= 0 AND p_alive <= 1', name='ck_churn_scores_p_alive'),
    sa.ForeignKeyConstraint(['member_id'], ['members.id']),
    sa.ForeignKeyConstraint(['fit_id'], ['churn_model_fits.id']),
    sa.PrimaryKeyConstraint('member_id', 'as_of_date'),
    )
    op.create_index('ix_churn_scores_date_p_alive', 'churn_scores', ['as_of_date', 'p_alive'])

    op.create_index('ix_orders_member_purchase', 'orders', ['member_id', 'placed_at', 'status', 'total_minor'])
    op.create_index('ix_order_lines_category_order', 'order_lines', ['category', 'order_id'])


def downgrade() -> None:
    op.drop_index('ix_order_lines_category_order', table_name='order_lines')
    op.drop_index('ix_orders_member_purchase', table_name='orders')
    op.drop_index('ix_churn_scores_date_p_alive', table_name='churn_scores')
    op.drop_table('churn_scores')
    op.drop_table('churn_model_fits')
    op.drop_index('ix_rfm_scores_date_cell', table_name='rfm_scores')
    op.drop_table('rfm_scores')
