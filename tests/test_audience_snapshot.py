"""Snapshot audiences: a segment's keys written once to the database and read back in pages, so the process
that resolves the audience holds bounds, not every member (on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from membercare.campaigns.audience import AudiencePage, resolve_audience
from membercare.campaigns.occurrence import RunOptions, prepare
from membercare.campaigns.plan import ensure_run, plan_group
from membercare.config import Settings
from membercare.delivery.models import OutboxMessage

AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 Asia/Taipei
SNAP = sa.table("audience_snapshots", sa.column("snapshot"), sa.column("seq"), sa.column("member_id"))


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=400, seed=11, as_of=AS_OF - timedelta(hours=10))
    return engine


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def snapshot_rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(SNAP)).scalar_one()


@pytest.mark.parametrize("campaign, limit", [("churn_winback", None), ("coupon_expiry", None),
                                             ("churn_winback", 7)])
def test_a_snapshot_holds_the_same_audience_as_the_list(shop, settings, campaign, limit):
    prepared = prepare(settings, campaign, RunOptions(as_of=AS_OF, limit=limit))
    listed = resolve_audience(shop, prepared)
    snap = resolve_audience(shop, prepared, snapshot=True)
    assert listed.entries, "the test needs a non-empty segment"
    assert snap.entries == [] and snap.snapshot is not None  # nothing held in this process
    assert (snap.size, len(snap), snap.source) == (listed.size, len(listed), listed.source)
    pages = snap.groups(5)
    assert all(isinstance(p, AudiencePage) for p in pages)
    assert [len(p) for p in pages][:-1] == [5] * (len(pages) - 1)
    loaded = [e for p in pages for e in p.load(shop)]  # type: ignore[union-attr]
    assert loaded == listed.entries  # same members, order and coupon codes
    assert [e for b in snap.batches(3, shop) for e in b] == listed.entries
    with pytest.raises(ValueError):
        next(iter(snap.batches(3)))
    snap.release(shop)
    snap.release(shop)  # idempotent
    assert snapshot_rows(shop) == 0


def test_planning_from_pages_plans_what_planning_from_the_list_plans(shop, settings):
    prepared = prepare(settings, "churn_winback", RunOptions(as_of=AS_OF))
    snap = resolve_audience(shop, prepared, snapshot=True)
    ensure_run(shop, prepared)
    total = sum(plan_group(shop, prepared, g).inserted for g in snap.groups(50))
    snap.release(shop)
    o = OutboxMessage.__table__
    with shop.connect() as conn:
        planned = conn.execute(sa.select(sa.func.count(sa.distinct(o.c.member_id)))
                               .where(o.c.campaign == "churn_winback")).scalar_one()
    assert total == len(snap) == planned
    # A second run of the same occurrence from a new snapshot plans nothing new.
    again = resolve_audience(shop, prepared, snapshot=True)
    assert sum(plan_group(shop, prepared, g).inserted for g in again.groups(50)) == 0
    again.release(shop)


def test_snapshots_left_by_a_dead_run_are_swept_by_the_next_resolve(shop, settings):
    with shop.begin() as conn:
        conn.execute(sa.insert(SNAP).values(snapshot="20200101T000000-deadbeef0000", seq=1, member_id=1))
    prepared = prepare(settings, "churn_winback", RunOptions(as_of=AS_OF))
    snap = resolve_audience(shop, prepared, snapshot=True)
    with shop.connect() as conn:
        names = set(conn.execute(sa.select(sa.distinct(SNAP.c.snapshot))).scalars())
    assert names == {snap.snapshot}
    snap.release(shop)
