"""The demo's journeys without the demo around them: a generated shop's month of member events, replayed on the
simulated clock through the ``POST /events`` path and the advancer, moves instances through their steps; a second
replay (a second demo run) stores no event, enters no one and plans no message again."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import sqlalchemy as sa

from journey_helpers import JI, NOCAP, OB, settings_for
from membercare.data.generator import generate_shop
from membercare.db import make_engine
from membercare.journeys.advance import Advancer
from membercare.journeys.definition import list_journeys
from membercare.journeys.demo import checkpoints, demo_events, post_until


def test_demo_events_on_a_simulated_clock_move_instances_through_their_steps_once(sqlite_url, clock, tmp_path):
    engine = make_engine(sqlite_url)
    settings = settings_for(tmp_path)
    now = clock()
    generate_shop(engine, members=300, seed=3, as_of=now - timedelta(hours=2))
    with engine.connect() as conn:
        events = demo_events(conn, now, seed=3)
        assert events == demo_events(conn, now, seed=3)  # deterministic for a seed
    names = Counter(e.body["name"] for e in events)
    assert names["member.joined"] and names["order.delivered"] and names["cart.updated"], names
    assert all(e.at <= now for e in events) and [e.at for e in events] == sorted(e.at for e in events)
    assert all(set(e.body) == {"id", "name", "member", "at", "properties"} for e in events)  # POST /events' shape
    journeys = list_journeys(settings)

    def replay():
        out, previous = [], None
        for at in checkpoints(now):
            with engine.begin() as conn:
                ingested = post_until(conn, events, journeys, previous, at)
            out.append((ingested, Advancer(engine, settings, clock=lambda at=at: at, policy=NOCAP).advance()))
            previous = at
        return out

    first = replay()
    assert sum(i.stored for i, _ in first) == len(events) and sum(i.entered for i, _ in first) > 0
    sends = [sum(r.sends.values()) for _, r in first]
    assert sum(sends[:-1]) > 0, "messages are planned at past stops of the clock"
    assert sum(r.completed for _, r in first) > 0
    with engine.connect() as conn:
        rows = conn.execute(sa.select(OB.c.id, OB.c.idempotency_key, OB.c.scheduled_at)
                            .where(OB.c.occurrence.like("journey:%"))).all()
        statuses = dict(conn.execute(sa.select(JI.c.status, sa.func.count()).group_by(JI.c.status)).tuples().all())
    assert rows and statuses.get("completed") and statuses.get("active")
    # Planned at the simulated instants, not at the wall clock: the oldest rows are weeks old.
    assert min(r.scheduled_at for r in rows) < now - timedelta(days=7)

    second = replay()
    assert sum(i.stored for i, _ in second) == 0 and sum(i.entered for i, _ in second) == 0
    assert sum(i.duplicates for i, _ in second) == len(events)
    assert sum(sum(r.sends.values()) for _, r in second) == 0
    with engine.connect() as conn:
        again = conn.execute(sa.select(OB.c.id, OB.c.idempotency_key, OB.c.scheduled_at)
                             .where(OB.c.occurrence.like("journey:%"))).all()
    assert sorted(again) == sorted(rows)
    engine.dispose()
