"""The send gate: consent, suppression, pause and the kill switch checked right before the provider call,
and crash recovery telling never-attempted rows (sent again) from rows that may have reached the provider.

Each window test changes the world *between* the claim and the provider call: a limiter stands where the
rate limit is taken (after the claim, before the gate) and performs the change the first time it is asked,
in its own committed transaction, as the receiver would before acknowledging a STOP.
"""

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from fakes import FakeAdapter, seed_members, simple_renderer
from membercare.consent import ConsentStatement, record_consents
from membercare.db import in_transaction, insert_for
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.gate import GroupCommit, kill_switch, pause_all, read_version, resume_all
from membercare.delivery.models import CampaignRun, OutboxMessage, Suppression, address_hash
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.delivery.reconcile import recover_stale
from membercare.models import Channel, Member, Purpose

NOW = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)  # 12:00 in Taipei: outside quiet hours
OB, R = OutboxMessage.__table__, CampaignRun.__table__
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
CFG = DispatchConfig(workers=4, batch_size=20, flush_interval=0.01)


def plan(engine, n, *, preferred="sms,email", name="promo"):
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred=preferred, now=NOW - timedelta(days=2),
                           consent=[(c, "marketing") for c in ("email", "sms", "push")])
    rep = plan_run(engine, PlanSpec(name, "2026-11-23", Purpose.MARKETING, (Channel.EMAIL, Channel.SMS)),
                   [ids], NOW, simple_renderer, policy=NOPOLICY)
    return rep.run_id, ids


def adapters():
    return {ch: FakeAdapter(ch) for ch in ("email", "sms", "push")}


class Window:
    """A limiter that runs ``change()`` once, when the first message of its channel is about to go."""

    def __init__(self, change):
        self.change, self.done, self.lock = change, False, threading.Lock()

    def acquire(self) -> float:
        with self.lock:
            if not self.done:
                self.done = True
                self.change()
        return 0.0

    def reserve(self) -> float:
        return 0.0

    def pause(self, seconds: float) -> None:
        return None


def dispatcher(engine, ads, **kw):
    return Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW, **kw)


def rows(engine, run_id):
    with engine.connect() as conn:
        return {r.member_id: r for r in conn.execute(sa.select(OB).where(OB.c.run_id == run_id))}


def test_consent_revoked_after_the_claim_is_honoured_with_a_fallback(engine):
    run_id, ids = plan(engine, 30)
    stopped = ids[:10]

    def stop():  # the receiver acknowledging STOP for ten members: committed before its 2xx
        with engine.begin() as conn:
            record_consents(conn, [ConsentStatement(m, "sms", "marketing", False, "sms_stop", NOW) for m in stopped])

    ads = adapters()
    d = dispatcher(engine, ads)
    d.limiters["sms"] = Window(stop)
    rep = d.dispatch(run_id)
    sms_to = Counter(m.message_id for m in ads["sms"].accepted)
    by = rows(engine, run_id)
    stopped_mids = {by[m].message_id for m in stopped}
    assert not stopped_mids & set(sms_to), "an SMS went out after the STOP was acknowledged"
    # The ten fell back to email (their other consented channel), with the reason, and were sent once.
    email_to = Counter(m.message_id for m in ads["email"].accepted)
    for m in stopped:
        r = by[m]
        assert (r.state, r.channel) == ("sent", "email")
        assert "sms no longer allowed right before sending" in r.reason
        assert email_to[r.message_id] == 1
    assert all(by[m].state == "sent" and by[m].channel == "sms" for m in ids[10:])
    assert max(sms_to.values()) == 1 and len(sms_to) == 20
    assert rep.gate_commits >= 1 and rep.gate_items >= 30


def test_suppression_after_the_claim_skips_the_member_without_another_channel(engine):
    run_id, ids = plan(engine, 12, preferred="sms")
    victim = ids[3]

    def bounce():
        with engine.begin() as conn:
            phone = conn.execute(sa.select(Member.__table__.c.phone).where(Member.__table__.c.id == victim)).scalar()
            conn.execute(insert_for(conn, Suppression.__table__), dict(
                channel="sms", address_hash=address_hash("sms", phone), member_id=None, reason="invalid",
                source="test", created_at=NOW))

    ads = adapters()
    d = dispatcher(engine, ads)
    d.limiters["sms"] = Window(bounce)
    d.dispatch(run_id)
    by = rows(engine, run_id)
    assert by[victim].state == "suppressed" and "checked right before sending" in by[victim].reason
    assert by[victim].message_id not in {m.message_id for m in ads["sms"].accepted}
    assert len(ads["sms"].accepted) == 11


def test_a_run_paused_after_the_claim_sends_nothing_more_and_keeps_its_rows(engine):
    run_id, ids = plan(engine, 25)

    def operator_pause():
        with engine.begin() as conn:
            conn.execute(sa.update(R).where(R.c.id == run_id).values(status="paused", status_reason="operator"))

    ads = adapters()
    d = dispatcher(engine, ads)
    d.limiters["sms"] = Window(operator_pause)
    rep = d.dispatch(run_id)
    assert ads["sms"].accepted == [] and ads["email"].accepted == []
    assert "paused" in (rep.stop_reason or "")
    states = Counter(r.state for r in rows(engine, run_id).values())
    assert states == {"planned": 25}  # never attempted: every row is waiting to be sent, none lost
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(OB.c.attempt_started_at.is_not(None))).scalar() == 0


def test_the_global_kill_switch_stops_every_run_until_resumed(engine):
    run_id, _ = plan(engine, 15)
    ads = adapters()
    d = dispatcher(engine, ads)
    d.limiters["sms"] = Window(lambda: pause_all(engine, "incident 42", now=NOW))
    rep = d.dispatch(run_id)
    assert ads["sms"].accepted == [] and "incident 42" in rep.stop_reason
    assert kill_switch(engine) == (True, "incident 42")
    resume_all(engine, now=NOW)
    assert kill_switch(engine) == (False, None)
    dispatcher(engine, ads).dispatch(run_id)
    assert len({m.message_id for m in ads["sms"].accepted}) == len(ads["sms"].accepted) == 15


def test_only_changes_that_can_forbid_a_send_move_the_version(engine):
    with engine.connect() as conn:
        v0 = read_version(conn)
    _, ids = plan(engine, 3)  # new members, consents, devices and a run: nothing to re-check
    with engine.connect() as conn:
        v1 = read_version(conn)
    with engine.begin() as conn:
        record_consents(conn, [ConsentStatement(ids[0], "email", "marketing", False, "unsubscribe", NOW)])
    with engine.connect() as conn:
        v2 = read_version(conn)
    with engine.begin() as conn:
        conn.execute(sa.update(Member.__table__).where(Member.__table__.c.id == ids[1]).values(phone=None))
    with engine.connect() as conn:
        v3 = read_version(conn)
    # planning a run moves its status once (planned -> ...) at most; revocation and contact changes always do
    assert v1 - v0 <= 1 and v2 == v1 + 1 and v3 == v2 + 1


def test_recovery_sends_never_attempted_rows_and_keeps_attempted_ones_unknown(engine):
    run_id, ids = plan(engine, 6)
    old = NOW - timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(sa.update(OB).where(OB.c.run_id == run_id).values(state="sending", claimed_by="dead:1",
                                                                      claimed_at=old))
        conn.execute(sa.update(OB).where(OB.c.member_id.in_(ids[:2])).values(attempt_started_at=old))
    rec = recover_stale(engine, lease=timedelta(minutes=5), now=NOW)
    assert (rec.unattempted, rec.unknown) == (4, 2)
    by = rows(engine, run_id)
    assert {by[m].state for m in ids[:2]} == {"unknown"}
    assert {by[m].state for m in ids[2:]} == {"planned"}
    assert {by[m].reason_code for m in ids[2:]} == {"never_attempted"}
    ads = adapters()
    dispatcher(engine, ads).dispatch(run_id)
    assert sorted(m.message_id for m in ads["sms"].accepted) == sorted(by[m].message_id for m in ids[2:])


def test_a_row_recovered_by_another_dispatcher_is_not_sent_by_the_first(engine):
    # The first dispatcher's claim outlived the lease (e.g. a long rate-limit wait): another dispatcher took
    # the row back. The first must not send it when its turn comes: the gate finds the row no longer its own.
    run_id, _ = plan(engine, 5, preferred="email")

    def lease_expired_meanwhile():
        recover_stale(engine, lease=timedelta(0), now=NOW + timedelta(seconds=1))

    ads = adapters()
    d = dispatcher(engine, ads)
    d.limiters["email"] = Window(lease_expired_meanwhile)
    d.dispatch(run_id)
    # Every row was sent exactly once: the rows recovered were claimed again (by the same loop) and sent.
    assert Counter(Counter(m.message_id for m in ads["email"].accepted).values()) == {1: 5}


def test_group_commit_batches_concurrent_callers_and_answers_each():
    seen: list[int] = []
    gate = threading.Event()

    def commit(batch):
        seen.append(len(batch))
        gate.wait(1)
        return {x: x * 10 for x in batch}

    gc = GroupCommit(commit)
    out = {}

    def call(x):
        out[x] = gc.submit(x)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert out == {i: i * 10 for i in range(1, 9)}
    assert sum(seen) == 8 and gc.commits == len(seen) < 8


def test_group_commit_hands_a_failure_to_every_caller_of_the_batch():
    def commit(batch):
        raise RuntimeError("database down")

    gc = GroupCommit(commit)
    try:
        gc.submit(1)
    except RuntimeError as exc:
        assert "database down" in str(exc)
    else:
        raise AssertionError("no error")


def test_in_transaction_reruns_work_after_a_dropped_connection(engine):
    # A connection that dies mid-transaction (pg_terminate_backend on PostgreSQL, a broken link) is replaced
    # and the work runs again from the start: the caller never sees the error.
    calls = []

    def work(conn):
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"),
                                          connection_invalidated=True)
        return conn.execute(sa.text("SELECT 41 + 1")).scalar()

    assert in_transaction(engine, work) == 42 and len(calls) == 2


@pytest.mark.postgres
def test_a_dispatcher_rides_out_terminated_database_connections(pg_url):
    # The server terminates every connection of the dispatcher (pg_terminate_backend, as a failover or an
    # operator would) three times during the run: the dispatcher reconnects, reruns the interrupted
    # transaction, keeps its buffered outcomes and finishes; every member gets exactly one message.
    from membercare.db import make_engine

    engine = make_engine(pg_url)
    admin = make_engine(pg_url)
    run_id, ids = plan(engine, 300, preferred="email")
    killed = []

    def terminate(_message, n):
        if n in (20, 120, 220):
            with admin.begin() as conn:
                killed.append(conn.execute(sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar())
        return None

    ads = adapters()
    ads["email"] = FakeAdapter("email", terminate)
    rep = dispatcher(engine, ads).dispatch(run_id)
    assert len(killed) == 3 and all(k >= 1 for k in killed)
    sent = Counter(m.message_id for m in ads["email"].accepted)
    assert len(sent) == 300 and max(sent.values()) == 1
    assert Counter(r.state for r in rows(engine, run_id).values()) == {"sent": 300}
    assert rep.status == "completed"
    engine.dispose()
    admin.dispose()


def test_an_outage_pauses_the_run_which_resumes_by_itself_when_the_provider_recovers(engine):
    from membercare.delivery.contract import TransientFailure
    from membercare.delivery.dispatcher import RunPaused

    run_id, ids = plan(engine, 60, preferred="email")
    now = [NOW]
    down = [True]

    def outage(_message, _n):
        return TransientFailure("503 from the provider") if down[0] else None

    ads = adapters()
    ads["email"] = FakeAdapter("email", outage)
    cfg = DispatchConfig(workers=4, batch_size=20, flush_interval=0.01, error_min_samples=10, backoff_base=1.0,
                         backoff_max=5.0)
    with engine.begin() as conn:  # the campaign allows it (campaign.yaml auto_resume_after: 60)
        conn.execute(sa.update(R).where(R.c.id == run_id).values(auto_resume_after_s=60.0))

    def d():
        return Dispatcher(engine, ads, config=cfg, policy=NOPOLICY, clock=lambda: now[0])

    rep = d().dispatch(run_id)
    assert "error budget spent" in rep.stop_reason and rep.resume_at == NOW + timedelta(seconds=60)
    now[0] = NOW + timedelta(seconds=30)
    with pytest.raises(RunPaused, match="resumes automatically"):
        d().dispatch(run_id)
    down[0] = False  # the provider recovered
    now[0] = NOW + timedelta(seconds=61)
    rep = d().dispatch(run_id)
    assert rep.status == "completed"
    assert len({m.message_id for m in ads["email"].accepted}) == len(ads["email"].accepted) == 60
    with engine.connect() as conn:
        assert conn.execute(sa.select(R.c.auto_resumes).where(R.c.id == run_id)).scalar() == 1


def test_without_the_campaigns_permission_an_outage_pause_waits_for_an_operator(engine):
    from membercare.delivery.contract import TransientFailure
    from membercare.delivery.dispatcher import RunPaused

    run_id, _ = plan(engine, 30, preferred="email")
    ads = adapters()
    ads["email"] = FakeAdapter("email", lambda _m, _n: TransientFailure("503 from the provider"))
    cfg = DispatchConfig(workers=4, batch_size=20, flush_interval=0.01, error_min_samples=10)
    rep = Dispatcher(engine, ads, config=cfg, policy=NOPOLICY, clock=lambda: NOW).dispatch(run_id)
    assert "error budget spent" in rep.stop_reason and rep.resume_at is None
    later = NOW + timedelta(days=1)
    with pytest.raises(RunPaused, match="resume it"):
        Dispatcher(engine, ads, config=cfg, policy=NOPOLICY, clock=lambda: later).dispatch(run_id)
