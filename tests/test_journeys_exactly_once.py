"""Each journey step exactly once: a crash inside an advancing batch (an exception between claim and send, an
exception after the send was planned, a process killed after planning) rolls the whole batch back, and the
next advancer takes it from where it was; two advancers at once on PostgreSQL take disjoint batches. In every
case each instance has exactly one outbox row per send step, and none is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter

import pytest
import sqlalchemy as sa

from journey_helpers import JI, JS, NOCAP, OB, ROOT, SECRET, advance, make_journey, members, send_event
from membercare.db import make_engine
from membercare.journeys.advance import Advancer

TWO_SENDS = """\
description: Two sends an hour apart.
entry: {event: test.start}
steps:
  - {id: first, send: {message: x_email}}
  - {id: gap, wait: {duration: 1h}}
  - {id: second, send: {message: x_push}}
"""
MESSAGES = {"x_email": "abandoned_cart_email", "x_push": "abandoned_cart_push"}


class Boom(Exception):
    pass


def start(engine, settings, clock, n):
    ids = members(engine, n, clock())
    for mid in ids:
        send_event(engine, settings, "test.start", mid, clock(), f"s-{mid}")
    return ids


def assert_exactly_once(engine, ids, steps=("first", "second")):
    with engine.connect() as conn:
        per_member = Counter(conn.execute(sa.select(OB.c.member_id)).scalars())
        keys = conn.execute(sa.select(OB.c.idempotency_key)).scalars().all()
        logged = Counter(conn.execute(sa.select(JS.c.step).where(JS.c.step.in_(steps))).scalars())
        left = conn.execute(sa.select(sa.func.count()).select_from(JI).where(JI.c.status == "active")).scalar()
    assert per_member == {mid: len(steps) for mid in ids}
    assert len(keys) == len(set(keys))
    assert logged == {s: len(ids) for s in steps}
    assert left == 0


def assert_partial(engine, n):
    """Some first sends committed (with their step logged), not all."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(OB)).scalar()
        logged = conn.execute(sa.select(sa.func.count()).select_from(JS).where(JS.c.step == "first")).scalar()
    assert 0 < rows < n and rows == logged


def test_an_exception_between_claim_and_send_and_one_after_planning_leave_nothing_behind(engine, clock, tmp_path):
    settings = make_journey(tmp_path, "x_test", TWO_SENDS, MESSAGES)
    ids = start(engine, settings, clock, 30)

    def crash(claimed):
        raise Boom(f"crash after claiming {len(claimed)}")

    with pytest.raises(Boom):
        advance(engine, settings, clock, batch_size=10, on_claimed=crash)

    class CrashAfterPlanning(Advancer):
        def _write(self, conn, states, now, rep):
            raise Boom("crash after the outbox rows were planned, before the commit")

    with pytest.raises(Boom):
        CrashAfterPlanning(engine, settings, clock=clock, policy=NOCAP, batch_size=10).advance()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(OB)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(JS)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(JI).where(JI.c.claim_token.is_not(None))
                            ).scalar() == 0
    # A crash in the third batch: the first two are done and stay done.
    batches = []

    def crash_third(claimed):
        batches.append(claimed)
        if len(batches) == 3:
            raise Boom("third batch")

    with pytest.raises(Boom):
        advance(engine, settings, clock, batch_size=10, on_claimed=crash_third)
    assert_partial(engine, len(ids))
    advance(engine, settings, clock, batch_size=10)
    clock.advance(hours=1)
    advance(engine, settings, clock, batch_size=10)
    assert_exactly_once(engine, ids)


CHILD = textwrap.dedent("""
    import os, signal, sys
    from datetime import datetime
    from pathlib import Path
    import membercare.journeys.advance as adv
    from membercare.config import Settings
    from membercare.db import make_engine
    from membercare.delivery.policies import PolicySettings

    url, templates, home, now, secret = sys.argv[1:]
    real, calls = adv.plan_sends, []

    def plan_then_die(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third batch's rows are in the outbox, not committed: killed here
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    adv.plan_sends = plan_then_die
    settings = Settings(home=Path(home), secret_key=secret, templates_dir=Path(templates))
    at = datetime.fromisoformat(now)
    adv.Advancer(make_engine(url), settings, clock=lambda: at, batch_size=10,
                 policy=PolicySettings(marketing_cap=None)).advance()
""")


@pytest.mark.slow
def test_a_process_killed_after_planning_a_send_is_repeated_by_nobody_and_skipped_by_nobody(db_url, clock,
                                                                                            tmp_path):
    engine = make_engine(db_url)
    settings = make_journey(tmp_path, "x_test", TWO_SENDS, MESSAGES)
    ids = start(engine, settings, clock, 40)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    child = subprocess.run([sys.executable, "-c", CHILD, db_url, str(settings.templates_dir), str(tmp_path / "home"),
                            clock().isoformat(), SECRET], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    assert_partial(engine, len(ids))  # the batches before the kill committed, the killed one left nothing
    advance(engine, settings, clock, batch_size=10)
    clock.advance(hours=1)
    advance(engine, settings, clock, batch_size=10)
    assert_exactly_once(engine, ids)
    engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_concurrent_advancers_on_postgres_send_each_step_once(pg_url, clock, tmp_path):
    engine = make_engine(pg_url)
    settings = make_journey(tmp_path, "x_test", TWO_SENDS, MESSAGES)
    ids = start(engine, settings, clock, 300)
    claimed: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        eng = make_engine(pg_url)
        try:
            barrier.wait()
            Advancer(eng, settings, clock=clock, policy=NOCAP, batch_size=15,
                     on_claimed=claimed[i].extend).advance()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            eng.dispose()

    for _ in range(2):  # the first sends, then (an hour later) the second
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        clock.advance(hours=1)
    assert claimed[0] and claimed[1], "both advancers took batches"
    assert_exactly_once(engine, ids)
    engine.dispose()
