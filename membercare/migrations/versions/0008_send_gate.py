"""send gate: a change counter for what may stop a send, a global kill switch, and the attempt marker

``delivery_controls`` is one row: ``version`` moves whenever something that can forbid a send changes
(a consent revoked, an address suppressed, contact data changed or erased, a push token invalidated, a
run's status changed) and ``paused_all`` is the operator's kill switch. Database triggers move the
version, so no writer (receiver, importer, preference page, CLI, a future one) can forget to. Only
changes that can *forbid* a send fire them (a revocation, not a grant), so bulk loads of new members
and consents cost nothing.

``outbox_messages.attempt_started_at`` is written, in the same transaction that re-checks the gate,
immediately before the provider call; a ``sending`` row without it was claimed but never attempted and
is safe to send after a crash.

Revision ID: 0008_send_gate
Revises: 0007_variants
Create Date: 2026-12-04 21:30:00
"""
import sqlalchemy as sa
from alembic import op

import membercare.timeutil

revision = "0008_send_gate"
down_revision = "0007_variants"
branch_labels = None
depends_on = None

BUMP = "UPDATE delivery_controls SET version = version + 1 WHERE id = 1"

# (trigger name, table, event, condition on OLD/NEW or None)
TRIGGERS = [
    ("trg_gate_consent_revoked", "consents", "UPDATE OF granted", "OLD.granted AND NOT NEW.granted"),
    ("trg_gate_consent_deleted", "consents", "DELETE", None),
    ("trg_gate_suppression_added", "suppressions", "INSERT", None),
    ("trg_gate_member_contact", "members", "UPDATE OF email, phone, preferred_channels",
     "OLD.email IS DISTINCT FROM NEW.email OR OLD.phone IS DISTINCT FROM NEW.phone "
     "OR OLD.preferred_channels IS DISTINCT FROM NEW.preferred_channels"),
    ("trg_gate_member_deleted", "members", "DELETE", None),
    ("trg_gate_device_invalidated", "devices", "UPDATE OF invalidated_at",
     "OLD.invalidated_at IS NULL AND NEW.invalidated_at IS NOT NULL"),
    ("trg_gate_run_status", "campaign_runs", "UPDATE OF status", "OLD.status IS DISTINCT FROM NEW.status"),
]


def upgrade() -> None:
    op.create_table(
        "delivery_controls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("paused_all", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("paused_reason", sa.String(length=500), nullable=True),
        sa.Column("updated_at", membercare.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("id = 1", name="ck_delivery_controls_singleton"),
    )
    op.execute("INSERT INTO delivery_controls (id, version, paused_all) VALUES (1, 0, false)")
    with op.batch_alter_table("outbox_messages") as batch_op:
        batch_op.add_column(sa.Column("attempt_started_at", membercare.timeutil.UTCDateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table("campaign_runs") as batch_op:
        batch_op.add_column(sa.Column("auto_resume_at", membercare.timeutil.UTCDateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("auto_resumes", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("auto_resume_after_s", sa.Float(), nullable=True))

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(f"""
            CREATE FUNCTION membercare_gate_bump() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN {BUMP}; RETURN NULL; END $$""")
        for name, table, event, cond in TRIGGERS:
            when = f" WHEN ({cond})" if cond else ""
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{when} "
                       "EXECUTE FUNCTION membercare_gate_bump()")
    else:
        for name, table, event, cond in TRIGGERS:
            # SQLite spells IS DISTINCT FROM as IS NOT.
            when = f" WHEN {cond.replace('IS DISTINCT FROM', 'IS NOT')}" if cond else ""
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{when} BEGIN {BUMP}; END")


def downgrade() -> None:
    for name, table, _event, _cond in TRIGGERS:
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS membercare_gate_bump()")
    with op.batch_alter_table("campaign_runs") as batch_op:
        batch_op.drop_column("auto_resume_after_s")
        batch_op.drop_column("auto_resumes")
        batch_op.drop_column("auto_resume_at")
    with op.batch_alter_table("outbox_messages") as batch_op:
        batch_op.drop_column("attempt_started_at")
    op.drop_table("delivery_controls")
