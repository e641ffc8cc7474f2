"""Operator controls through the CLI entry: pause, resume, cancel a run, and the global kill switch, while a
dispatcher is sending. Nothing is sent after the command returned; after a resume every row is sent once."""

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from clirun import run_cli
from fakes import FakeAdapter, seed_members, simple_renderer
from membercare.delivery.controls import find_run
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher, RunPaused
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.models import Channel, Purpose

NOW = datetime(2026, 11, 23, 4, 0, tzinfo=UTC)  # 12:00 in Taipei: outside quiet hours
OB = OutboxMessage.__table__
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
# One worker thread: the limiter that runs the CLI command stands right before the gate of the next message,
# so "nothing after the command returned" is exact.
CFG = DispatchConfig(workers=1, batch_size=10, flush_interval=0.01)


def plan(engine, n):
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred="sms,email", now=NOW - timedelta(days=2),
                           consent=[(c, "marketing") for c in ("email", "sms", "push")])
    rep = plan_run(engine, PlanSpec("promo", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL, Channel.SMS)),
                   [ids], NOW, simple_renderer, policy=NOPOLICY)
    return rep.run_id


class After:
    """A limiter that runs ``action()`` once, right before the gate of the ``n``-th message."""

    def __init__(self, n, action):
        self.n, self.action, self.calls, self.lock = n, action, 0, threading.Lock()
        self.sent_at_action: int | None = None

    def acquire(self) -> float:
        with self.lock:
            self.calls += 1
            if self.calls == self.n:
                self.action()
        return 0.0

    def reserve(self) -> float:
        return 0.0

    def pause(self, seconds: float) -> None:
        return None


def cli(db_url, tmp_path, *args):
    return run_cli(*args, home=tmp_path, env={"MEMBERCARE_DATABASE_URL": db_url})


def states(engine, run_id):
    with engine.connect() as conn:
        return Counter(conn.execute(sa.select(OB.c.state).where(OB.c.run_id == run_id)).scalars())


@pytest.mark.slow  # several CLI processes
def test_pause_mid_dispatch_then_resume_sends_everything_exactly_once(engine, db_url, tmp_path):
    run_id = plan(engine, 30)
    ads = {ch: FakeAdapter(ch) for ch in ("email", "sms", "push")}
    seen: dict[str, int] = {}

    def pause():
        p = cli(db_url, tmp_path, "campaign", "pause", str(run_id), "--reason", "wrong coupon", "--by", "ops")
        assert p.returncode == 0, p.stderr
        seen["sent"] = len(ads["sms"].accepted)

    d = Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW)
    d.limiters["sms"] = After(12, pause)
    rep = d.dispatch(run_id)
    assert seen["sent"] == 11 and len(ads["sms"].accepted) == 11, "a message went out after the pause"
    assert "paused by ops" in (rep.stop_reason or "") and "wrong coupon" in (rep.stop_reason or "")
    assert states(engine, run_id) == {"sent": 11, "planned": 19}
    info = find_run(engine, run_id)
    assert info.status == "paused" and "wrong coupon" in (info.reason or "")
    status = cli(db_url, tmp_path, "campaign", "status", "promo/2026-11-23")
    assert status.returncode == 0 and "paused by ops" in status.stdout and "planned 19" in status.stdout

    # Paused: another dispatcher (dispatch-due, a rerun) refuses to start it.
    again = Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW)
    try:
        again.dispatch(run_id)
        raise AssertionError("a paused run was dispatched")
    except Exception as exc:  # noqa: BLE001 - RunPaused
        assert "paused" in str(exc)

    r = cli(db_url, tmp_path, "campaign", "resume", str(run_id), "--by", "ops")
    assert r.returncode == 0, r.stderr
    Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW).dispatch(run_id)
    sent = Counter(m.message_id for m in ads["sms"].accepted + ads["email"].accepted)
    assert len(sent) == 30 and max(sent.values()) == 1
    assert states(engine, run_id) == {"sent": 30}
    assert find_run(engine, run_id).status == "completed"


@pytest.mark.slow  # several CLI processes
def test_cancel_mid_dispatch_skips_what_is_left_and_is_never_resumed(engine, db_url, tmp_path):
    run_id = plan(engine, 20)
    ads = {ch: FakeAdapter(ch) for ch in ("email", "sms", "push")}

    def cancel():
        p = cli(db_url, tmp_path, "campaign", "cancel", str(run_id), "--reason", "typo in subject",
                "--settle-wait", "0")
        assert p.returncode == 0, p.stderr

    d = Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW)
    d.limiters["sms"] = After(6, cancel)
    rep = d.dispatch(run_id)
    assert "the run is cancelled" in (rep.stop_reason or "") and "typo in subject" in (rep.stop_reason or "")
    # The row the gate handed back after the cancel was settled when the dispatcher's pass ended: nothing is
    # left waiting for a dispatcher that will never come.
    assert states(engine, run_id) == {"sent": 5, "skipped": 15}
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(OB.c.reason_code).where(OB.c.state == "skipped")).scalars()) == {"cancelled"}
    info = find_run(engine, run_id)
    assert info.status == "cancelled" and info.cancelled and "typo in subject" in (info.reason or "")
    status = cli(db_url, tmp_path, "campaign", "status", str(run_id))
    assert "cancelled" in status.stdout and "skipped 15" in status.stdout
    r = cli(db_url, tmp_path, "campaign", "resume", str(run_id))
    assert r.returncode == 1 and "never resumed" in r.stderr
    r = cli(db_url, tmp_path, "campaign", "pause", str(run_id))
    assert r.returncode == 1 and "cancelled" in r.stderr
    # No dispatcher starts it again (a rerun, dispatch-due), not even with resume.
    with pytest.raises(RunPaused, match="cancelled"):
        Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW).dispatch(run_id, resume=True)
    assert len(ads["sms"].accepted) + len(ads["email"].accepted) == 5
    assert cli(db_url, tmp_path, "campaign", "cancel", str(run_id), "--settle-wait", "0").returncode == 0  # idempotent
    assert find_run(engine, run_id).reason == info.reason


@pytest.mark.slow  # several CLI processes
def test_kill_switch_through_the_cli_stops_every_run_until_resume_all(engine, db_url, tmp_path):
    run_id = plan(engine, 15)
    ads = {ch: FakeAdapter(ch) for ch in ("email", "sms", "push")}

    def kill():
        p = cli(db_url, tmp_path, "pause-all", "--reason", "provider incident")
        assert p.returncode == 0, p.stderr

    d = Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW)
    d.limiters["sms"] = After(4, kill)
    rep = d.dispatch(run_id)
    assert len(ads["sms"].accepted) == 3 and "provider incident" in (rep.stop_reason or "")
    s = cli(db_url, tmp_path, "campaign", "status")
    assert "PAUSED" in s.stdout and "provider incident" in s.stdout
    assert cli(db_url, tmp_path, "resume-all").returncode == 0
    Dispatcher(engine, ads, config=CFG, policy=NOPOLICY, clock=lambda: NOW).dispatch(run_id)
    assert len({m.message_id for m in ads["sms"].accepted}) == len(ads["sms"].accepted) == 15


def test_unknown_run_is_a_usage_error_naming_the_runs(engine, db_url, tmp_path):
    plan(engine, 2)
    r = cli(db_url, tmp_path, "campaign", "pause", "999")
    assert r.returncode == 1 and "unknown campaign run '999'" in r.stderr and "promo/2026-11-23" in r.stderr


def test_a_cancelled_run_reads_cancelled_in_its_summary_artifact(engine):
    """What the run's table and markdown artifacts are built from: the status, the reason, the skipped rows."""
    from membercare.campaigns.summary import summarise
    from membercare.delivery.controls import cancel_run

    run_id = plan(engine, 6)
    cancel_run(engine, run_id, reason="campaign withdrawn", by="mei", settle_wait_s=0)
    s = summarise(engine, run_id, campaign="promo", occurrence="2026-11-23", segment_size=6)
    assert s.status == "cancelled" and "cancelled by mei" in (s.status_reason or "")
    rows = {r["metric"]: r["value"] for r in s.table()}
    assert rows["status"].startswith("cancelled (cancelled by mei") and rows["skipped: cancelled"] == 6
    assert s.waiting == 0 and s.deferred == 0
