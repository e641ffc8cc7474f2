"""Engines, sessions and the few dialect differences the rest of the code needs.

SQLite (the embedded default) gets WAL, foreign keys and a busy timeout so that a reader (the
webhook receiver) and a writer (a dispatcher) can share the file. PostgreSQL goes through psycopg 3.
Schema changes are Alembic migrations (:func:`upgrade`); nothing calls ``create_all`` on a real database.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session

from membercare.config import Settings, normalise_database_url

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    url = normalise_database_url(url)
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, echo=echo, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN until the first write, which breaks
        # "read then write atomically"; emit BEGIN ourselves (documented SQLAlchemy recipe).
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return engine
    return sa.create_engine(url, echo=echo, pool_pre_ping=True)


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


def is_retryable(exc: BaseException) -> bool:
    """A database error after which the whole transaction can simply be run again (deadlock victim)."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, sa.exc.OperationalError) and getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES


def in_transaction(engine: Engine, work: Callable[[sa.Connection], T], *, attempts: int = 5) -> T:
    """``work(conn)`` in its own transaction, run again from the start if PostgreSQL picked it as a
    deadlock victim. Two writers that touch the same rows in different orders (a dispatcher recording
    outcomes, the receiver settling rows from provider events) can deadlock; the victim's rollback leaves
    nothing behind, so ``work`` must only be idempotent with respect to its own earlier, rolled-back tries."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.OperationalError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            time.sleep(random.uniform(0.01, 0.05) * attempt)
    raise AssertionError("unreachable")


def is_sqlite(bind: Engine | sa.Connection | Session) -> bool:
    return _dialect(bind).name == "sqlite"


def _dialect(bind):
    if isinstance(bind, Session):
        bind = bind.get_bind()
    return bind.dialect


def insert_for(bind, table):
    """The dialect's ``INSERT`` (which has ``on_conflict_do_nothing`` / ``on_conflict_do_update``)."""
    table = getattr(table, "__table__", table)
    return (sqlite.insert if is_sqlite(bind) else postgresql.insert)(table)


def alembic_config(url: str):
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
