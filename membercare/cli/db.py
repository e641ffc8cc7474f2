"""``membercare db ...``: schema migrations."""

from __future__ import annotations

import logging

import typer

from membercare.cli import app
from membercare.cli.common import console, state

db_app = typer.Typer(help="Database schema: create or upgrade with Alembic migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _redacted(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("heads", help="Target revision (default: latest).")) -> None:
    """Create the database or upgrade it to the latest schema, keeping existing data."""
    from membercare.db import current_revision, upgrade

    logging.getLogger("alembic").setLevel(logging.WARNING)
    url = state.settings.db_url
    before = current_revision(state.engine)
    upgrade(url, revision)
    after = current_revision(state.engine)
    if before == after:
        console.print(f"database {_redacted(url)} is already at revision {after}")
    else:
        console.print(f"database {_redacted(url)} upgraded from {before or 'empty'} to {after}")


@db_app.command("status")
def db_status() -> None:
    """Show the database URL (password hidden) and its schema revision."""
    from membercare.db import current_revision, head_revision, pending_revisions

    url = state.settings.db_url
    cur, pending = current_revision(state.engine), pending_revisions(state.engine)
    note = f"needs upgrade to {head_revision()}: run `membercare db upgrade`" if pending else "up to date"
    console.print(f"{_redacted(url)}: revision {cur or 'none'} ({note})")
