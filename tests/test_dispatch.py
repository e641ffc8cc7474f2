"""Dispatch with in-process fake adapters: exactly once, retries and throttling, fallback, error budget,
configuration errors, crash recovery (SIGKILL in a subprocess) and concurrent dispatchers on PostgreSQL."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from fakes import FakeAdapter, seed_members, simple_renderer
from membercare.consent import ConsentStatement, record_consents
from membercare.db import make_engine
from membercare.delivery.contract import FailureReason, PermanentFailure, TransientFailure
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher, RunPaused
from membercare.delivery.models import CampaignRun, OutboxMessage, Suppression
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.delivery.ratelimit import TokenBucket
from membercare.delivery.reconcile import StaticRecords, mark_sent_from_event, reconcile_unknown, recover_stale
from membercare.errors import ConfigurationError
from membercare.models import Channel, Device, Purpose

OB, R = OutboxMessage.__table__, CampaignRun.__table__
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
FAST = DispatchConfig(workers=8, batch_size=50, backoff_base=0.005, backoff_max=0.05, wait_for_deferred=5.0,
                      flush_interval=0.02, error_min_samples=20)


def plan(engine, n, *, preferred="email,sms,push", purpose=Purpose.MARKETING, name="promo",
         channels=("email", "sms", "push"), now=None):
    """Seed ``n`` members and plan them at ``now``: a test that dispatches with an injected clock passes that
    clock's instant; otherwise the real clock is read once, as the dispatcher's default clock will be."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred=preferred,
                           consent=[(c, purpose.value) for c in ("email", "sms", "push")], now=now)
    rep = plan_run(engine, PlanSpec(name, "2026-11-23", purpose, tuple(Channel(c) for c in channels)),
                   [ids[i : i + 500] for i in range(0, n, 500)], now, simple_renderer, policy=NOPOLICY)
    return rep.run_id


def adapters(**scripts):
    return {ch: FakeAdapter(ch, scripts.get(ch)) for ch in ("email", "sms", "push")}


def states(engine, run_id):
    with engine.connect() as conn:
        return Counter(dict(conn.execute(sa.select(OB.c.state, sa.func.count()).where(OB.c.run_id == run_id)
                                         .group_by(OB.c.state)).all()))


def run_status(engine, run_id):
    with engine.connect() as conn:
        return conn.execute(sa.select(R.c.status, R.c.status_reason).where(R.c.id == run_id)).one()


def test_every_message_is_sent_exactly_once_and_rerun_sends_nothing(engine):
    run_id = plan(engine, 300)
    ad = adapters()
    rep = Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert rep.outcomes["sent"] == 300 and rep.status == "completed"
    sent = [m.idempotency_key for m in ad["email"].accepted]
    assert len(sent) == len(set(sent)) == 300
    assert states(engine, run_id) == {"sent": 300}
    with engine.connect() as conn:
        row = conn.execute(sa.select(OB).limit(1)).mappings().one()
        counts = json.loads(conn.execute(sa.select(R.c.counts).where(R.c.id == run_id)).scalar())
    assert row["provider_message_id"] == f"email-{row['message_id']}" and row["sent_at"] is not None
    assert row["reason"].startswith("sent via email (preference #1") and counts == {"sent": 300}
    again = Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert again.attempts == 0 and len(ad["email"].accepted) == 300


def test_transient_faults_and_429s_are_retried_until_accepted_once(engine):
    run_id = plan(engine, 300)
    rnd = random.Random(7)
    lock = threading.Lock()
    faults = Counter()

    def flaky(msg, n):
        with lock:
            roll = rnd.random()
        if roll < 0.2:
            faults["5xx"] += 1
            return TransientFailure("503 service unavailable", status=503)
        if roll < 0.35:
            faults["429"] += 1
            return TransientFailure("429 too many requests", retry_after=0.01, throttled=True, status=429)
        return None

    ad = adapters(email=flaky)
    # The default error-budget sample floor: with 20 % random 5xx, a 20-answer window can exceed 50 % by chance.
    cfg = DispatchConfig(**{**FAST.__dict__, "error_min_samples": 50})
    rep = Dispatcher(engine, ad, config=cfg, policy=NOPOLICY, rng=random.Random(1)).dispatch(run_id)
    keys = [m.idempotency_key for m in ad["email"].accepted]
    assert faults["5xx"] > 20 and faults["429"] > 10
    assert len(keys) == len(set(keys)) == 300
    assert states(engine, run_id) == {"sent": 300} and rep.status == "completed"
    assert rep.outcomes["throttled"] == faults["429"] and rep.outcomes["retry"] == faults["5xx"]
    with engine.connect() as conn:
        # Throttling does not use up the retry allowance; 5xx do.
        tf = conn.execute(sa.select(sa.func.sum(OB.c.transient_failures))).scalar()
        attempts = conn.execute(sa.select(sa.func.sum(OB.c.attempts))).scalar()
    assert tf == faults["5xx"] and attempts == 300 + faults["5xx"] + faults["429"]


def test_retry_after_is_honoured_and_retries_are_bounded(engine):
    run_id = plan(engine, 3)
    t0 = datetime.now(UTC)
    ad = adapters(email=lambda m, n: TransientFailure("timeout", retry_after=3600))
    rep = Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert rep.status == "dispatching" and rep.next_due_at >= t0 + timedelta(seconds=3599)
    assert states(engine, run_id) == {"deferred": 3}
    run_id2 = plan(engine, 2, name="other")
    cfg = DispatchConfig(**{**FAST.__dict__, "max_transient_failures": 3})
    rep = Dispatcher(engine, adapters(email=lambda m, n: TransientFailure("503")), config=cfg,
                     policy=NOPOLICY).dispatch(run_id2)
    assert states(engine, run_id2) == {"failed": 2}
    with engine.connect() as conn:
        reasons = set(conn.execute(sa.select(OB.c.reason_code).where(OB.c.run_id == run_id2)).scalars())
        assert reasons == {"retries_exhausted"}


def test_unregistered_token_falls_back_to_email_and_invalidates_the_device(engine):
    run_id = plan(engine, 20, preferred="push,email")
    ad = adapters(push=lambda m, n: PermanentFailure(FailureReason.UNREGISTERED_TOKEN, "404 UNREGISTERED"))
    rep = Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert rep.outcomes["fallback"] == 20 and len(ad["email"].accepted) == 20 and not ad["push"].accepted
    assert states(engine, run_id) == {"sent": 20}
    with engine.connect() as conn:
        row = conn.execute(sa.select(OB).limit(1)).mappings().one()
        dead = conn.execute(sa.select(sa.func.count()).where(Device.__table__.c.invalidated_at.is_not(None))).scalar()
    assert row["channel"] == "email" and row["attempts"] == 2
    assert "fallback because push failed permanently (unregistered_token" in row["reason"]
    assert dead == 20


def test_opt_out_without_fallback_fails_and_suppresses_the_number(engine):
    run_id = plan(engine, 5, preferred="sms,email")
    ad = adapters(sms=lambda m, n: PermanentFailure(FailureReason.OPTED_OUT, "21610", fallback=False))
    Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert states(engine, run_id) == {"failed": 5} and not ad["email"].accepted
    with engine.connect() as conn:
        sup = conn.execute(sa.select(Suppression.__table__)).mappings().all()
    assert len(sup) == 5 and {s["reason"] for s in sup} == {"unsubscribe"}
    assert all(len(s["address_hash"]) == 64 for s in sup)


def test_error_budget_pauses_the_run(engine):
    run_id = plan(engine, 400)
    ad = adapters(email=lambda m, n: PermanentFailure(FailureReason.REJECTED, "bad content") if n % 3 else None)
    rep = Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    status, reason = run_status(engine, run_id)
    assert status == "paused" and reason.startswith("error budget spent")
    assert rep.stop_reason.startswith("error budget spent")
    st = states(engine, run_id)
    assert st["planned"] > 200 and st["sending"] == 0 and st["sent"] + st["failed"] + st["planned"] == 400
    with pytest.raises(RunPaused):
        Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    ok = adapters()
    Dispatcher(engine, ok, config=FAST, policy=NOPOLICY).dispatch(run_id, resume=True)
    assert states(engine, run_id)["planned"] == 0 and run_status(engine, run_id)[0] == "completed"


def test_configuration_error_stops_the_run_and_returns_rows_to_planned(engine):
    run_id = plan(engine, 120)

    def bad_key(msg, n):
        raise ConfigurationError("SendGrid rejected the API key (401)")

    with pytest.raises(ConfigurationError, match="API key"):
        Dispatcher(engine, adapters(email=bad_key), config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert states(engine, run_id) == {"planned": 120}
    status, reason = run_status(engine, run_id)
    assert status == "paused" and "configuration error" in reason
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.max(OB.c.attempts))).scalar() == 0
    # A channel without an adapter is a configuration error too, raised before any send.
    with pytest.raises(ConfigurationError, match="no adapter"):
        Dispatcher(engine, {}, config=FAST, policy=NOPOLICY).dispatch(run_id, resume=True)
    assert states(engine, run_id) == {"planned": 120}


def test_pre_send_checks_honour_late_unsubscribes_and_quiet_hours(engine, clock):
    run_id = plan(engine, 3, preferred="sms,email", now=clock())  # 12:00 Taipei
    with engine.begin() as conn:
        a, b, c = conn.execute(sa.select(OB.c.member_id).order_by(OB.c.member_id)).scalars().all()
        t = clock.advance(hours=1)  # revoked after planning
        record_consents(conn, [ConsentStatement(a, "sms", "marketing", False, "sms_stop", t),
                               ConsentStatement(b, "sms", "marketing", False, "sms_stop", t),
                               ConsentStatement(b, "email", "marketing", False, "unsubscribe_link", t)])
    clock.set(datetime(2026, 11, 23, 14, tzinfo=UTC))  # 22:00 Taipei
    ad = adapters()
    Dispatcher(engine, ad, config=FAST, policy=PolicySettings(marketing_cap=None), clock=clock).dispatch(run_id)
    by = {r["member_id"]: r for r in (dict(x) for x in engine.connect().execute(sa.select(OB)).mappings())}
    assert by[a]["state"] == "sent" and by[a]["channel"] == "email"  # sms revoked -> email, no quiet hours for email
    assert by[b]["state"] == "skipped" and by[b]["reason_code"] == "no_consent"
    assert by[c]["state"] == "deferred" and by[c]["reason_code"] == "quiet_hours"
    assert by[c]["next_attempt_at"] == datetime(2026, 11, 24, 1, tzinfo=UTC) and by[c]["attempts"] == 0


def test_stale_sending_rows_become_unknown_and_are_reconciled(engine):
    run_id = plan(engine, 4)
    run_t = plan(engine, 1, name="receipt", purpose=Purpose.TRANSACTIONAL)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sa.update(OB).values(state="sending", claimed_by="dead:1", claimed_at=now - timedelta(hours=2),
                                         attempt_started_at=now - timedelta(hours=2)))
        ids = conn.execute(sa.select(OB.c.message_id).where(OB.c.run_id == run_id).order_by(OB.c.id)).scalars().all()
    assert recover_stale(engine, lease=timedelta(minutes=5)).unknown == 5
    with engine.connect() as conn:
        assert "dead:1" in conn.execute(sa.select(OB.c.reason).limit(1)).scalar()
    # Webhook event for one, provider record for another; the rest are past the grace period.
    with engine.begin() as conn:
        assert mark_sent_from_event(conn, ids[0], provider_message_id="sg-1", source="sendgrid delivered")
    rep = reconcile_unknown(engine, records=StaticRecords({ids[1]: "sg-2"}), grace=timedelta(minutes=30))
    assert (rep.found_sent, rep.left_unknown, rep.requeued) == (1, 2, 1)
    assert states(engine, run_id) == {"sent": 2, "unknown": 2}
    assert states(engine, run_t) == {"planned": 1}  # transactional: resent
    with engine.connect() as conn:
        reasons = set(conn.execute(sa.select(OB.c.reason_code).where(OB.c.state == "unknown")).scalars())
    assert reasons == {"unknown_not_resent"}
    # A dispatcher never resends unknown rows.
    ad = adapters()
    Dispatcher(engine, ad, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert not ad["email"].accepted


def test_token_bucket_paces_and_pauses():
    now = [0.0]
    waits = []
    b = TokenBucket(10, burst=2, clock=lambda: now[0], sleep=waits.append)
    assert [round(b.reserve(), 3) for _ in range(4)] == [0, 0, 0.1, 0.2]
    now[0] = 10.0
    b.pause(5)
    assert round(b.reserve(), 3) == 5.0


def test_rate_limit_bounds_throughput(sqlite_engine):
    run_id = plan(sqlite_engine, 30)
    cfg = DispatchConfig(**{**FAST.__dict__, "rate_limits": {"email": 100.0}})
    t0 = time.monotonic()
    Dispatcher(sqlite_engine, adapters(), config=cfg, policy=NOPOLICY).dispatch(run_id)
    # A burst of 10 (a tenth of a second's worth) then 20 more at 100/s: at least 0.2 s. A lower bound only.
    assert time.monotonic() - t0 >= 0.19


# ---------------------------------------------------------------------------------------------------------------------
# Crash test: SIGKILL a dispatcher subprocess at random points, rerun, then count.

CHILD = textwrap.dedent(
    """
    import sys
    from fakes import FakeAdapter
    from membercare.db import make_engine
    from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
    from membercare.delivery.policies import PolicySettings

    url, run_id, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ads = {ch: FakeAdapter(ch, latency=0.004, record_path=record) for ch in ("email", "sms", "push")}
    cfg = DispatchConfig(workers=6, batch_size=40, flush_interval=0.05, lease=__import__("datetime").timedelta(0))
    Dispatcher(make_engine(url), ads, config=cfg, policy=PolicySettings(marketing_cap=None, quiet_hours=None)
               ).dispatch(run_id, resume=True)
    """
)


@pytest.mark.slow
def test_sigkilled_dispatcher_never_duplicates_and_leaves_no_row_unaccounted(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    n = 2000
    run_id = plan(engine, n)
    script, record = tmp_path / "child.py", tmp_path / "accepted.log"
    script.write_text(CHILD)
    rnd = random.Random(42)
    kills = 0
    # The child imports the test doubles (tests/fakes.py) as the tests do.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}

    def accepted() -> int:
        return len(record.read_text().splitlines()) if record.exists() else 0

    for _ in range(6):
        # Kill at a random point of *progress* (not of time), so the test crashes mid-run however fast
        # the machine or the dispatcher is.
        target = accepted() + rnd.randint(50, 300)
        p = subprocess.Popen([sys.executable, str(script), sqlite_url, str(run_id), str(record)], env=env)
        deadline = time.monotonic() + 60
        while p.poll() is None and accepted() < target and time.monotonic() < deadline:
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        # lease=0 in the child: the next dispatcher turns the dead one's in-flight rows into unknown.
    recover_stale(engine, lease=timedelta(0))
    lines = record.read_text().splitlines() if record.exists() else []
    records = {ln.split()[0]: ln.split()[2] for ln in lines}
    reconcile_unknown(engine, run_id=run_id, records=StaticRecords(records), grace=timedelta(0))
    p = subprocess.run([sys.executable, str(script), sqlite_url, str(run_id), str(record)], timeout=120, env=env)
    assert p.returncode == 0
    lines = record.read_text().splitlines()
    keys = Counter(ln.split()[1] for ln in lines)
    assert kills >= 2
    assert not [k for k, c in keys.items() if c > 1], "duplicate sends"
    st = states(engine, run_id)
    assert st["sending"] == st["planned"] == st["deferred"] == 0
    # Every acceptance the provider recorded is in the ledger as sent; nothing was lost.
    assert st["sent"] == len(keys) == n - st["unknown"]
    with engine.connect() as conn:
        assert all(conn.execute(sa.select(OB.c.reason).where(OB.c.state == "unknown")).scalars())
        # Only rows whose provider call had begun can be unknown (at most one per worker thread per kill);
        # claimed rows still waiting for a worker were never attempted and were sent after the crash.
        unknown_unattempted = conn.execute(sa.select(sa.func.count()).where(
            OB.c.state == "unknown", OB.c.attempt_started_at.is_(None))).scalar_one()
        resent = conn.execute(sa.select(sa.func.count()).where(
            OB.c.state == "sent", OB.c.reason.like("%stopped before the provider call, sent again%"))).scalar_one()
    assert unknown_unattempted == 0
    assert st["unknown"] <= kills * 6
    assert resent > 0
    engine.dispose()


# ---------------------------------------------------------------------------------------------------------------------
# Several dispatchers on one run (PostgreSQL: FOR UPDATE SKIP LOCKED).


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_dispatchers_on_postgres_send_each_message_once(pg_url):
    engine = make_engine(pg_url)
    run_id = plan(engine, 3000)
    shared = adapters()
    for a in shared.values():
        a.latency = 0.001
    reports = []

    def work(i):
        eng = make_engine(pg_url)
        reports.append(Dispatcher(eng, shared, config=FAST, policy=NOPOLICY, worker_id=f"w{i}").dispatch(run_id))
        eng.dispose()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    keys = Counter(m.idempotency_key for m in shared["email"].accepted)
    assert len(keys) == 3000 and max(keys.values()) == 1
    assert states(engine, run_id) == {"sent": 3000}
    assert sum(r.outcomes["sent"] for r in reports) == 3000
    assert sum(1 for r in reports if r.outcomes["sent"] > 0) >= 2  # the work was actually shared
    engine.dispose()


def test_rows_settled_by_provider_events_during_the_send_are_not_blamed_on_the_lease(sqlite_engine, caplog):
    # The provider's webhook (delivered, opened, ...) can reach the receiver before the dispatcher records
    # the provider's answer; the receiver then settles the row as sent. That is expected, not a lost lease.
    run_id = plan(sqlite_engine, 6)

    def event_arrives_first(message, _n):
        with sqlite_engine.begin() as conn:
            assert mark_sent_from_event(conn, message.message_id, provider_message_id=f"pm-{message.message_id}")
        return None  # then the provider's own answer: accepted

    caplog.set_level("DEBUG", logger="membercare.delivery.dispatcher")
    Dispatcher(sqlite_engine, adapters(email=event_arrives_first), config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert states(sqlite_engine, run_id)["sent"] == 6
    assert "lease too short" not in caplog.text
    assert "already settled as sent by provider events" in caplog.text

    # A row taken away by recovery (another dispatcher's lease expiry) is still reported.
    run2 = plan(sqlite_engine, 3, name="promo2")

    def recovered_meanwhile(message, _n):
        recover_stale(sqlite_engine, lease=timedelta(0))
        return None

    caplog.clear()
    Dispatcher(sqlite_engine, adapters(email=recovered_meanwhile), config=FAST, policy=NOPOLICY).dispatch(run2)
    assert "lease too short" in caplog.text
