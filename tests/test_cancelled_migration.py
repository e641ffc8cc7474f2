"""Migration 0016_cancelled: the run status CHECK admits 'cancelled' on a database that already holds runs and
outbox rows; runs cancelled the old way (paused, reason 'cancelled ...') become cancelled; the send gate's
run-status trigger survives SQLite's table copy."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from fakes import seed_members, simple_renderer
from membercare.db import alembic_config, make_engine, upgrade
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.models import Channel, Purpose

NOW = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)
REVISION = "0016_cancelled"


def _before(url: str) -> None:
    down = ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(REVISION).down_revision
    upgrade(url, str(down))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def bare_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    import os
    import uuid

    admin = os.environ.get("MEMBERCARE_TEST_POSTGRES_URL")
    if not admin:
        pytest.skip("PostgreSQL not configured")
    name = f"mc_mig_{uuid.uuid4().hex[:10]}"
    with make_engine(admin).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
    yield url
    with make_engine(admin).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_keeps_runs_and_rows_and_converts_old_cancels(bare_url):
    _before(bare_url)
    engine = make_engine(bare_url)
    with engine.begin() as conn:
        ids = seed_members(conn, 6, preferred="email", now=NOW - timedelta(days=2))
    nopolicy = PolicySettings(marketing_cap=None, quiet_hours=None)
    old = plan_run(engine, PlanSpec("promo", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL,)), [ids[:3]], NOW,
                   simple_renderer, policy=nopolicy).run_id
    live = plan_run(engine, PlanSpec("news", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL,)), [ids[3:]], NOW,
                    simple_renderer, policy=nopolicy).run_id
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE campaign_runs SET status = 'paused', status_reason = "
                             f"'cancelled by ops at 2026-11-23T04:00:00+00:00: typo' WHERE id = {old}")
        with pytest.raises(sa.exc.IntegrityError):
            with conn.begin_nested():
                conn.exec_driver_sql(f"UPDATE campaign_runs SET status = 'cancelled' WHERE id = {live}")
    engine.dispose()

    upgrade(bare_url, REVISION)
    engine = make_engine(bare_url)
    with engine.begin() as conn:
        runs = dict(conn.exec_driver_sql("SELECT id, status FROM campaign_runs").all())
        assert runs == {old: "cancelled", live: "planned"}
        assert conn.exec_driver_sql("SELECT count(*) FROM outbox_messages").scalar_one() == 6
        version = conn.exec_driver_sql("SELECT version FROM delivery_controls").scalar_one()
        conn.exec_driver_sql(f"UPDATE campaign_runs SET status = 'cancelled' WHERE id = {live}")
        # The send gate's trigger still moves the version when a run's status changes.
        assert conn.exec_driver_sql("SELECT version FROM delivery_controls").scalar_one() == version + 1
        with pytest.raises(sa.exc.IntegrityError):
            with conn.begin_nested():
                conn.exec_driver_sql(f"UPDATE campaign_runs SET status = 'bogus' WHERE id = {live}")
    if bare_url.startswith("sqlite"):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    engine.dispose()
