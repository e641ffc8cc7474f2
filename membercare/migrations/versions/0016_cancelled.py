"""cancelled: a terminal run status

``campaign_runs.status`` admits ``'cancelled'``: an operator's cancel is final (never resumed, never
dispatched again) and shows as its own status instead of a pause with a special reason. Runs cancelled
before this revision (paused with a reason starting ``cancelled``) become ``cancelled``.

SQLite cannot alter a CHECK constraint in place, and batch mode's table copy cannot be used here:
``outbox_messages`` refers to ``campaign_runs``, so dropping the old copy fails on every outbox row (deferred
foreign keys still fail at commit, and ``PRAGMA foreign_keys`` cannot change inside the migration's
transaction). Admitting one more value cannot make an existing row invalid, so the constraint's text is
rewritten in the schema instead: the procedure SQLite documents for loosening a CHECK constraint
(https://www.sqlite.org/lang_altertable.html, "writable_schema"), with the schema version moved so that
every connection reads the new definition. The table, its rows and its triggers stay as they are.

Revision ID: 0016_cancelled
Revises: 0015_propensity
Create Date: 2026-12-05 22:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0016_cancelled"
down_revision = "0015_propensity"
branch_labels = None
depends_on = None

OLD = ("planned", "dispatching", "paused", "completed", "failed")
NEW = OLD + ("cancelled",)
NAME = "ck_campaign_runs_status"


def _check(values: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _swap(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint(NAME, "campaign_runs", type_="check")
        op.create_check_constraint(NAME, "campaign_runs", sa.text(_check(new)))
        return
    sql = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'campaign_runs'").scalar_one()
    before, after = f"CONSTRAINT {NAME} CHECK ({_check(old)})", f"CONSTRAINT {NAME} CHECK ({_check(new)})"
    if before not in sql:
        raise RuntimeError(f"campaign_runs: {NAME} is not {_check(old)!r}; not rewriting it")
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar_one()
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        bind.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'campaign_runs'",
                             (sql.replace(before, after),))
        bind.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = OFF")


def upgrade() -> None:
    _swap(OLD, NEW)
    op.execute("UPDATE campaign_runs SET status = 'cancelled', auto_resume_at = NULL "
               "WHERE status = 'paused' AND status_reason LIKE 'cancelled%'")


def downgrade() -> None:
    op.execute("UPDATE campaign_runs SET status = 'paused' WHERE status = 'cancelled'")
    _swap(NEW, OLD)
