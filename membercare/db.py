"""Engines, sessions and the few dialect differences the rest of the code needs.

SQLite (the embedded default) gets WAL, foreign keys and a busy timeout so that a reader (the
webhook receiver) and a writer (a dispatcher) can share the file. PostgreSQL goes through psycopg 3.
Schema changes are Alembic migrations (:func:`upgrade`); nothing calls ``create_all`` on a real database.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

from membercare.config import Settings, normalise_database_url

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    url = normalise_database_url(url)
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, echo=echo, connect_args={"timeout": 60}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN until the first write, which breaks
        # "read then write atomically"; emit BEGIN ourselves (documented SQLAlchemy recipe).
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return engine
    # hide_parameters: a database error's message must never carry the bound values (member data).
    return sa.create_engine(url, echo=echo, pool_pre_ping=True, hide_parameters=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener own transactions
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def engine_from_settings(settings: Settings) -> Engine:
    if not settings.database_url:
        settings.ensure_home()
    return make_engine(settings.db_url)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# PostgreSQL aborts one of two transactions that wait on each other's row locks (deadlock_detected) and may
# refuse a serializable one (serialization_failure); either is safe to run again from the start.
RETRYABLE_SQLSTATES = ("40P01", "40001")
# The connection went away: the server terminated it (admin_shutdown, e.g. pg_terminate_backend; crash or
# restart), or the link broke (class 08). The transaction is gone with it (possibly after its commit).
DISCONNECT_SQLSTATES = ("57P01", "57P02", "57P03")
# How long a dropped connection is retried before the error is raised: a server restart takes seconds.
DISCONNECT_RETRY_SECONDS = 30.0


def is_retryable(exc: BaseException) -> bool:
    """A database error after which the whole transaction can simply be run again (deadlock victim)."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, sa.exc.OperationalError) and getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES


def is_disconnect(exc: BaseException) -> bool:
    """The connection was lost (SQLAlchemy invalidated it, or the server said it is shutting it down)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return state in DISCONNECT_SQLSTATES or state.startswith("08")


def in_transaction(engine: Engine, work: Callable[[sa.Connection], T], *, attempts: int = 5,
                   disconnect_seconds: float = DISCONNECT_RETRY_SECONDS) -> T:
    """``work(conn)`` in its own transaction, run again from the start when that is safe and useful:

    * PostgreSQL picked it as a deadlock victim (up to ``attempts`` tries). Two writers that touch the same
      rows in different orders (a dispatcher recording outcomes, the receiver settling rows from provider
      events) can deadlock; the victim's rollback leaves nothing behind.
    * The connection dropped (the server was restarted, or terminated the backend): tried again on a new
      connection with growing pauses for up to ``disconnect_seconds``. The dropped try may have committed
      before its answer was lost, so ``work`` must be harmless to run twice: every caller's statements are
      conditional on the rows' state or ``ON CONFLICT DO NOTHING``.
    """
    deadline = time.monotonic() + disconnect_seconds
    pause = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.DBAPIError as exc:
            if is_retryable(exc) and attempt < attempts:
                time.sleep(random.uniform(0.01, 0.05) * attempt)
                continue
            if is_disconnect(exc) and time.monotonic() + pause < deadline:
                log.warning("database connection lost (%s); running the transaction again in %.2fs",
                            type(getattr(exc, "orig", exc)).__name__, pause)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            raise


def is_sqlite(bind: Engine | sa.Connection | Session) -> bool:
    return _dialect(bind).name == "sqlite"


def _dialect(bind):
    if isinstance(bind, Session):
        bind = bind.get_bind()
    return bind.dialect


def insert_for(bind: Engine | sa.Connection | Session,
               table: sa.Table | type[SQLModel]) -> sqlite.Insert | postgresql.Insert:
    """The dialect's ``INSERT`` (which has ``on_conflict_do_nothing`` / ``on_conflict_do_update``)."""
    # A table model's table, or the table itself (SQLModel declares ``__table__`` only on table models).
    target = cast(sa.Table, getattr(table, "__table__", table))
    return (sqlite.insert if is_sqlite(bind) else postgresql.insert)(target)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: escape % in passwords.
    cfg.set_main_option("sqlalchemy.url", normalise_database_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "heads") -> None:
    """Apply migrations up to ``revision`` (``membercare db upgrade``)."""
    from alembic import command

    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    """The database's revision(s), comma-joined and sorted; ``None`` for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
    return ",".join(sorted(heads)) or None


def pending_revisions(engine: Engine) -> list[str]:
    """Migrations not yet applied to the database (empty when it is up to date).

    Uses Alembic's own graph walk, so branches and ``depends_on`` are handled; comparing head
    lists would not be (a revision reached only through ``depends_on`` is not a stored head).
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    if not current:
        return [r.revision for r in script.walk_revisions()]
    return [r.revision for r in script.iterate_revisions("heads", current)]


def head_revision() -> str:
    """The latest revision(s) of the code, in the same form as :func:`current_revision`."""
    from alembic.script import ScriptDirectory

    return ",".join(sorted(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()))
