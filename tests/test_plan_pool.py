"""Planning with worker processes (plan_group with RunOptions.processes), on SQLite and PostgreSQL.

The pooled path must write exactly what the serial path writes (same decisions, same rendered bytes for the
same message ids), including frequency-cap decisions that it can only take under the planning lock; a rerun
adds nothing; and a template that fails for one member in a worker aborts planning with that member named,
after the batches before it were written.
"""

from __future__ import annotations

import itertools
import os
import shutil
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from fakes import simple_renderer
from membercare.campaigns import SegmentRef, load_campaign
from membercare.campaigns.audience import resolve_audience
from membercare.campaigns.occurrence import PreparedRun, RunOptions, prepare
from membercare.campaigns.plan import (
    DEFAULT_MAX_PROCESSES,
    POOL_MIN_MEMBERS,
    PlanOutcome,
    RenderFailed,
    plan_group,
    planning_processes,
)
from membercare.config import Settings
from membercare.db import make_engine
from membercare.delivery.models import CampaignRun, OutboxMessage, decode_contents
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.errors import InputError
from membercare.models import Channel, Purpose

AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 Asia/Taipei
OB, R = OutboxMessage.__table__, CampaignRun.__table__
MEMBERS = 300
# A cap of one marketing message a week, SMS never: the cap both skips members and shortens chains.
POLICY = PolicySettings(marketing_cap=1, channel_caps={"sms": 0})
IGNORED = {"id", "run_id", "created_at", "updated_at"}


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=MEMBERS, seed=5, as_of=AS_OF - timedelta(hours=10))
    return engine


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def prepared_for(settings: Settings, processes: int, *, batch_size: int = 40) -> PreparedRun:
    """The birthday campaign (email, SMS, push, an offer coupon) sent to every member."""
    camp = load_campaign("birthday", settings)
    camp = camp.model_copy(update={"segment": SegmentRef(name="new_members", params={"days": 3650})})
    return prepare(settings, camp, RunOptions(as_of=AS_OF, batch_size=batch_size, processes=processes),
                   check=False)


def ids_from(prefix: str):
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):028d}"


def outbox(engine, campaign: str = "birthday") -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(OB).where(OB.c.campaign == campaign).order_by(OB.c.idempotency_key)).mappings()
        return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows]


def plan(engine, prepared: PreparedRun, prefix: str = "m") -> PlanOutcome:
    audience = resolve_audience(engine, prepared)
    assert audience.size == len(audience) == MEMBERS
    return plan_group(engine, prepared, audience.entries, policy=POLICY, message_ids=ids_from(prefix))


def test_pool_writes_exactly_what_the_serial_path_writes_and_a_rerun_adds_nothing(shop, settings):
    # Another campaign of higher priority already holds the only weekly slot of the first 100 members.
    with shop.begin() as conn:
        first = conn.execute(sa.text("SELECT id FROM members ORDER BY id LIMIT 100")).scalars().all()
    plan_run(shop, PlanSpec("vip_news", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL,), priority=100),
             [first], AS_OF - timedelta(hours=1), simple_renderer, policy=POLICY)

    serial = plan(shop, prepared_for(settings, 0))
    expected = outbox(shop)
    with shop.begin() as conn:
        conn.execute(sa.delete(OB).where(OB.c.campaign == "birthday"))
        conn.execute(sa.delete(R).where(R.c.campaign == "birthday"))

    pooled = plan(shop, prepared_for(settings, 2))
    got = outbox(shop)
    assert got == expected  # every column but ids and timestamps, content bytes included
    assert (pooled.inserted, pooled.by_state, pooled.by_reason) == (serial.inserted, serial.by_state, serial.by_reason)
    reasons = {r["reason_code"] for r in got}
    assert {"frequency_cap", "holdout", "routed"} <= reasons, reasons
    routed = [r for r in got if r["content"]]
    assert routed and all("sms" not in (r["channel"], *r["fallback_channels"].split(",")) for r in routed)
    for r in routed:  # the stored content covers exactly the (capped) chain
        chain = [r["channel"], *filter(None, r["fallback_channels"].split(","))]
        assert sorted(decode_contents(r["content"])) == sorted(chain)

    again = plan(shop, prepared_for(settings, 2), prefix="x")
    assert again.inserted == 0 and again.already_planned == MEMBERS
    assert outbox(shop) == got


def test_a_render_error_in_a_worker_names_the_member_and_keeps_earlier_batches(shop, settings, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(settings.templates_dir, templates)
    prepared = prepared_for(settings, 2)
    entries = resolve_audience(shop, prepared).entries
    # Every channel's template fails for the members of the fourth batch of 40 (some of them get a message).
    victims = [e.member_id for e in entries[120:160]]
    for part in ("email_subject", "sms", "push_title"):
        for loc in ("en", "zh-TW"):
            path = templates / "birthday" / f"{part}.{loc}.txt"
            path.write_text(f"{{% if member.id in {victims} %}}{{{{ no_such_variable }}}}{{% endif %}}"
                            + path.read_text(encoding="utf-8"), encoding="utf-8")
    broken = Settings(home=settings.home, secret_key=settings.secret_key, templates_dir=templates)
    named = "|".join(map(str, victims))
    with pytest.raises(RenderFailed, match=f"rendering (email|sms|push) for member id ({named})\\b"):
        plan_group(shop, prepared_for(broken, 2), entries, policy=PolicySettings(marketing_cap=None))
    planned = {r["member_id"] for r in outbox(shop)}
    assert planned == {e.member_id for e in entries[:120]}  # the three batches before the failing one


def test_how_many_processes_plan(settings, tmp_path, monkeypatch):
    file_engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    memory = make_engine("sqlite://")
    opts = RunOptions(batch_size=1000)
    assert planning_processes(file_engine, opts, 1000) == 0  # one batch: nothing to overlap
    assert planning_processes(file_engine, opts, POOL_MIN_MEMBERS - 1) == 0
    assert planning_processes(memory, RunOptions(processes=4), 100_000) == 0
    assert planning_processes(file_engine, RunOptions(processes=3), 5000) == 3
    assert planning_processes(file_engine, RunOptions(processes=0), 100_000) == 0
    # The default: one worker per core (capped) for large groups, serial on one core or for small groups.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert planning_processes(file_engine, opts, 100_000) == 2
    assert planning_processes(file_engine, opts, POOL_MIN_MEMBERS - 1) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert planning_processes(file_engine, opts, 100_000) == DEFAULT_MAX_PROCESSES
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert planning_processes(file_engine, opts, 100_000) == 0
    with pytest.raises(InputError, match="processes"):
        RunOptions(processes=-1)
    file_engine.dispose()
    memory.dispose()


def test_sqlite_bulk_insert_stores_what_sqlalchemy_stores(tmp_path):
    from membercare.delivery.sqlutil import insert_many_sqlite
    from membercare.timeutil import UTCDateTime

    engine = make_engine(f"sqlite:///{tmp_path / 'bulk.db'}")
    t = sa.Table("t", sa.MetaData(), sa.Column("k", sa.String, unique=True), sa.Column("at", UTCDateTime),
                 sa.Column("n", sa.Integer), sa.Column("blob", sa.LargeBinary))
    t.create(engine)
    taipei = timezone(timedelta(hours=8))
    rows = [dict(k=f"k{i}", at=datetime(2026, 11, 23, 10, i, tzinfo=taipei) if i % 3 else None, n=i,
                 blob=bytes([i])) for i in range(6)]
    with engine.begin() as conn:
        conn.execute(t.insert(), [{**r, "k": "ref" + r["k"]} for r in rows])  # SQLAlchemy's own path
        assert insert_many_sqlite(conn, t, rows, conflict=["k"]) == 6
        assert insert_many_sqlite(conn, t, rows[:2] + [{**rows[0], "k": "new"}], conflict=["k"]) == 1
        raw = {k: (at, n, blob) for k, at, n, blob in conn.exec_driver_sql("SELECT k, at, n, blob FROM t")}
        back = {r.k: r.at for r in conn.execute(sa.select(t))}
    for r in rows:
        assert raw[r["k"]] == raw["ref" + r["k"]]  # byte-identical storage
        assert back[r["k"]] == r["at"]  # and read back as the same aware instant
    engine.dispose()
