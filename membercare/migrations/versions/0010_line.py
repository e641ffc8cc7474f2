"""LINE: a fourth channel, and the member's LINE user id

* ``members.line_user_id`` (unique when set): the address of the LINE channel.
* Every channel CHECK constraint (consents, consent_events, outbox_messages, engagement_events,
  suppressions) admits ``'line'``.
* The send gate's member trigger (0008) also fires when ``line_user_id`` changes, so a dispatcher
  re-checks a member whose LINE id was replaced or erased.

SQLite cannot alter a CHECK constraint in place: batch mode copies the table, and a copied table loses
its triggers, so the send-gate triggers of ``consents`` and ``suppressions`` are created again after it.

Revision ID: 0010_line
Revises: 0009_journeys
Create Date: 2026-12-05 00:30:00
"""
import warnings

import sqlalchemy as sa
from alembic import op

revision = "0010_line"
down_revision = "0009_journeys"
branch_labels = None
depends_on = None

BUMP = "UPDATE delivery_controls SET version = version + 1 WHERE id = 1"
OLD = ("email", "sms", "push")
NEW = ("email", "sms", "push", "line")

# (table, constraint, nullable channel, extra values)
CHECKS = [
    ("consents", "ck_consents_channel", False, ()),
    ("consent_events", "ck_consent_events_channel", False, ()),
    ("outbox_messages", "ck_outbox_channel", True, ()),
    ("engagement_events", "ck_engagement_events_channel", False, ()),
    ("suppressions", "ck_suppressions_channel", False, ("any",)),
]
# The 0008 triggers on the tables batch mode copies on SQLite: (name, table, event, condition).
GATE_TRIGGERS = [
    ("trg_gate_consent_revoked", "consents", "UPDATE OF granted", "OLD.granted AND NOT NEW.granted"),
    ("trg_gate_consent_deleted", "consents", "DELETE", None),
    ("trg_gate_suppression_added", "suppressions", "INSERT", None),
]
MEMBER_TRIGGER = "trg_gate_member_contact"


def _member_trigger(columns: tuple[str, ...]) -> tuple[str, str, str, str]:
    cond = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns)
    return MEMBER_TRIGGER, "members", f"UPDATE OF {', '.join(columns)}", cond


def _check(nullable: bool, values: tuple[str, ...]) -> str:
    listed = "channel IN (" + ", ".join(f"'{v}'" for v in values) + ")"
    return f"channel IS NULL OR {listed}" if nullable else listed


def _create_trigger(name: str, table: str, event: str, cond: str | None) -> None:
    if op.get_bind().dialect.name == "postgresql":
        when = f" WHEN ({cond})" if cond else ""
        op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{when} "
                   "EXECUTE FUNCTION membercare_gate_bump()")
    else:
        when = f" WHEN {cond.replace('IS DISTINCT FROM', 'IS NOT')}" if cond else ""
        op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{when} BEGIN {BUMP}; END")


def _drop_trigger(name: str, table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")


def _swap_checks(channels: tuple[str, ...]) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, name, nullable, extra in CHECKS:
        with warnings.catch_warnings():
            # Reflecting a table that refers to members meets its lower(email) index, which SQLAlchemy skips
            # with a warning; members itself is not copied.
            warnings.simplefilter("ignore", sa.exc.SAWarning)
            with op.batch_alter_table(table, recreate="always" if sqlite else "auto") as batch_op:
                batch_op.drop_constraint(name, type_="check")
                batch_op.create_check_constraint(name, sa.text(_check(nullable, channels + extra)))
    if sqlite:
        for name, table, event, cond in GATE_TRIGGERS:
            _drop_trigger(name, table)
            _create_trigger(name, table, event, cond)


def upgrade() -> None:
    # A plain ADD COLUMN on both backends: batch mode would reflect members, whose expression index
    # (lower(email)) SQLAlchemy cannot reflect.
    op.add_column("members", sa.Column("line_user_id", sa.String(length=64), nullable=True))
    op.create_index("uq_members_line_user_id", "members", ["line_user_id"], unique=True)
    _swap_checks(NEW)
    _drop_trigger(MEMBER_TRIGGER, "members")
    _create_trigger(*_member_trigger(("email", "phone", "preferred_channels", "line_user_id")))


def downgrade() -> None:
    op.execute("DELETE FROM consents WHERE channel = 'line'")
    op.execute("DELETE FROM consent_events WHERE channel = 'line'")
    op.execute("DELETE FROM engagement_events WHERE channel = 'line'")
    op.execute("DELETE FROM suppressions WHERE channel = 'line'")
    op.execute("UPDATE outbox_messages SET channel = NULL WHERE channel = 'line'")
    _swap_checks(OLD)
    _drop_trigger(MEMBER_TRIGGER, "members")
    _create_trigger(*_member_trigger(("email", "phone", "preferred_channels")))
    op.drop_index("uq_members_line_user_id", table_name="members")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite 3.35+ drops a column in place; batch mode would copy members and lose its triggers.
        op.execute("ALTER TABLE members DROP COLUMN line_user_id")
    else:
        op.drop_column("members", "line_user_id")
