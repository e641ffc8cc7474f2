"""Shared fixtures.

Databases: ``engine`` runs a test on SQLite and on PostgreSQL. The PostgreSQL variant needs
``MEMBERCARE_TEST_POSTGRES_URL`` (CI sets ``postgresql://postgres@127.0.0.1:5432/test``) and is
skipped with that reason otherwise. Every test gets a fresh, fully migrated database: a copy of a
migrated SQLite file, or ``CREATE DATABASE ... TEMPLATE`` of a migrated PostgreSQL database, so
that concurrent test sessions never share state.

Wall clock: ``--wall-clock WHEN`` (or ``MEMBERCARE_TEST_WALL_CLOCK=WHEN``) runs the tests with the
process's clock moved to ``WHEN`` (e.g. ``23:59`` or ``03:00`` in Asia/Taipei), restarted there for
each test; see tests/clock.py for the format and for what the travel does not reach.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from clock import CHILD_SITE, OFFSET_ENV, SHOP_TZ, Clock, parse_wall_clock, real_time
from membercare.db import make_engine, upgrade

# The session-wide Prefect harness fixture (started only by the tests that ask for ``prefect_harness``).
pytest_plugins = ["prefect_fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts Prefect's test harness (15-20 s once, then about a second per flow run) is slow: the
    fast lane (``-m "not slow"``) leaves it to the full suite."""
    for item in items:
        if "prefect_harness" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)

PG_ENV = "MEMBERCARE_TEST_POSTGRES_URL"
WALL_CLOCK_ENV = "MEMBERCARE_TEST_WALL_CLOCK"
# clock.OFFSET_ENV is read by tests/wall_clock_child/sitecustomize.py in child processes: seconds from the real
# clock to the moved one. Not MEMBERCARE_*: tests that give a child a clean configuration drop those variables.
_WALL_CLOCK = pytest.StashKey[tuple]()
FIXTURES = Path(__file__).parent / "fixtures"


def pytest_addoption(parser):
    parser.addoption(
        "--wall-clock", metavar="WHEN", default=os.environ.get(WALL_CLOCK_ENV) or None,
        help=f"run with the wall clock moved to WHEN (HH:MM[:SS] today in Asia/Taipei, or an ISO datetime), "
             f"restarted there for each test; default ${WALL_CLOCK_ENV}. See tests/clock.py.")


def pytest_configure(config):
    when = config.getoption("--wall-clock", default=None)
    if not when:
        return
    import time_machine

    try:
        at = parse_wall_clock(when)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    # Started here rather than in a fixture so that module-level instants read at collection are moved too.
    session = time_machine.travel(at, tick=True)
    session.start()
    config.stash[_WALL_CLOCK] = (at, session, os.environ.get("PYTHONPATH"))
    # Child processes move their clocks too (tests/wall_clock_child/sitecustomize.py).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [CHILD_SITE, os.environ.get("PYTHONPATH")]))
    _publish_offset()


def _publish_offset() -> None:
    import time

    os.environ[OFFSET_ENV] = repr(time.time() - real_time())


def pytest_unconfigure(config):
    if _WALL_CLOCK in config.stash:
        _, session, pythonpath = config.stash[_WALL_CLOCK]
        session.stop()
        os.environ.pop(OFFSET_ENV, None)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def pytest_report_header(config):
    if _WALL_CLOCK in config.stash:
        at = config.stash[_WALL_CLOCK][0]
        local = at.astimezone(SHOP_TZ)
        return f"wall clock: each test starts at {at.isoformat()} ({local:%Y-%m-%d %H:%M:%S} Asia/Taipei)"
    return None


@pytest.fixture(autouse=True)
def _wall_clock(request):
    """Restart the moved wall clock at ``--wall-clock`` for each test (nothing without the option)."""
    if _WALL_CLOCK not in request.config.stash:
        yield
        return
    import time_machine

    with time_machine.travel(request.config.stash[_WALL_CLOCK][0], tick=True):
        _publish_offset()
        yield


def _pg_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def _with_database(url: str, name: str) -> str:
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


def _autocommit(url: str):
    return make_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dbtemplate") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template():
    admin = _pg_admin_url()
    if not admin:
        pytest.skip(f"PostgreSQL not configured: set {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    name = f"mc_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with _autocommit(admin) as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    upgrade(_with_database(admin, name))
    yield name
    with _autocommit(admin) as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fresh_sqlite_url(template: Path, tmp_path: Path) -> str:
    path = tmp_path / "membercare.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def sqlite_url(sqlite_template, tmp_path) -> str:
    return _fresh_sqlite_url(sqlite_template, tmp_path)


def _fresh_pg_url(template: str):
    admin = _pg_admin_url()
    name = f"mc_t_{uuid.uuid4().hex[:12]}"
    with _autocommit(admin) as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return admin, name


@pytest.fixture
def pg_url(pg_template):
    admin, name = _fresh_pg_url(pg_template)
    yield _with_database(admin, name)
    with _autocommit(admin) as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """A fresh migrated database URL, once per backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url):
    eng = make_engine(sqlite_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> Clock:
    """The test's one clock, frozen at ``clock.FROZEN_NOW`` until the test moves it (see tests/clock.py)."""
    return Clock()
