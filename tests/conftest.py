"""Shared fixtures.

Databases: ``engine`` runs a test on SQLite and on PostgreSQL. The PostgreSQL variant needs
``MEMBERCARE_TEST_POSTGRES_URL`` (CI sets ``postgresql://postgres@127.0.0.1:5432/test``) and is
skipped with that reason otherwise. Every test gets a fresh, fully migrated database: a copy of a
migrated SQLite file, or ``CREATE DATABASE ... TEMPLATE`` of a migrated PostgreSQL database, so
that concurrent test sessions never share state.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from clock import Clock
from membercare.db import make_engine, upgrade

# The session-wide Prefect harness fixture (started only by the tests that ask for ``prefect_harness``).
pytest_plugins = ["prefect_fixtures"]

PG_ENV = "MEMBERCARE_TEST_POSTGRES_URL"
FIXTURES = Path(__file__).parent / "fixtures"


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
