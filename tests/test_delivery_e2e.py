"""End to end through the provider sandbox with the real SDKs (sendgrid, twilio, firebase-admin).

* the ambiguous window: the sandbox's "ghost" fault accepts and records a message, then drops the
  connection; nothing is resent and reconciliation against ``GET /sandbox/messages`` settles every ghost;
* a 10,000-member campaign with mixed preferences, consents, devices, invalid and STOP'ed numbers, stale
  tokens and suppressions: every reachable member exactly once on the right channel, a reason for everyone else;
* a crash test: dispatcher subprocesses SIGKILLed at random points of a 10,000-message run, then rerun;
* a fault test: 20 % transient faults plus 429s, every message accepted exactly once;
* several dispatcher processes on one run on PostgreSQL.

The sandbox runs in the test process (its own event-loop thread); dispatchers that get killed run in
subprocesses, so the sandbox and its records survive them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from fakes import seed_members, simple_renderer
from membercare.db import insert_for, make_engine
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import CampaignRun, OutboxMessage, Suppression, address_hash
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.delivery.reconcile import SandboxRecords, reconcile_unknown, recover_stale
from membercare.models import Channel, Device, Member, Purpose
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for

OB, R = OutboxMessage.__table__, CampaignRun.__table__
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
ALL = (Channel.EMAIL, Channel.SMS, Channel.PUSH)
# No simulated STOP replies or app uninstalls: they would change later answers for the same address. The
# status callbacks go to a closed port (PUBLIC_URL): one attempt each, no retries.
QUIET = {"engagement": {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")},
         "webhook_max_attempts": 1}
FAST = DispatchConfig(workers=32, batch_size=200, backoff_base=0.05, backoff_max=0.5, wait_for_deferred=10.0,
                      flush_interval=0.05, ambiguous_retry_delay=0.2, error_min_samples=10_000)


def batches(ids, size=1000):
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def plan(engine, ids, *, purpose=Purpose.MARKETING, name="e2e", channels=ALL):
    spec = PlanSpec(name, "2026-11-23", purpose, tuple(channels))
    return plan_run(engine, spec, batches(ids), datetime.now(UTC), simple_renderer, policy=NOPOLICY).run_id


def seed(engine, n, *, purpose=Purpose.MARKETING, preferred="email,sms,push"):
    # The real clock throughout: the sandbox and the receiver stamp and check events with it.
    with engine.begin() as conn:
        return seed_members(conn, n, preferred=preferred,
                            consent=[(c.value, purpose.value) for c in ALL], now=datetime.now(UTC))


def ledger(engine, run_id):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(
            OB.c.message_id, OB.c.idempotency_key, OB.c.member_id, OB.c.channel, OB.c.state, OB.c.reason_code,
            OB.c.reason, OB.c.provider_message_id).where(OB.c.run_id == run_id)).mappings()]


def assert_sandbox_matches_ledger(sandbox, rows):
    """Every sent row has exactly one sandbox record on its channel (same provider id); nothing else was sent."""
    stats = sandbox.stats()
    assert stats["duplicates_by_message_id_total"] == 0
    assert stats["duplicates_by_idempotency_key_total"] == 0
    records = sandbox.messages()
    by_mid = {r["message_id"]: r for r in records}
    assert len(by_mid) == len(records)
    sent = {r["message_id"]: r for r in rows if r["state"] == "sent"}
    assert set(by_mid) == set(sent), "sandbox records and sent rows differ"
    for mid, row in sent.items():
        rec = by_mid[mid]
        assert rec["channel"] == row["channel"] and rec["idempotency_key"] == row["idempotency_key"]
        assert rec["provider_id"] == row["provider_message_id"]
    return records


# ---------------------------------------------------------------------------------------------------------------------
# The ambiguous window: accepted, then the connection dropped.


@pytest.mark.parametrize("channel", ["email", "sms", "push"])
def test_ghosted_marketing_messages_become_unknown_and_reconcile_as_sent_without_resending(
        engine, sandbox, adapters, channel):
    sandbox.configure(**QUIET, **{channel: {"ghost_rate": 0.5}})
    run_id = plan(engine, seed(engine, 60, preferred=channel), channels=(Channel(channel),))
    rep = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
    ghosts = sandbox.stats()["faults"][channel]["ghost"]
    assert 10 <= ghosts <= 50 and rep.outcomes["unknown"] == ghosts and rep.outcomes["sent"] == 60 - ghosts
    rows = ledger(engine, run_id)
    unknown = [r for r in rows if r["state"] == "unknown"]
    assert all(r["reason_code"] == "ambiguous_failure" and "may have accepted" in r["reason"] for r in unknown)
    assert sandbox.stats()["accepted"][channel] == 60  # each message reached the provider exactly once

    # Reconciliation by our message id against GET /sandbox/messages (over HTTP, field names as served).
    report = reconcile_unknown(engine, run_id=run_id, records=SandboxRecords(sandbox.url), grace=timedelta(0))
    assert report.found_sent == ghosts and report.left_unknown == 0
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": 60}
    assert all(r["reason_code"] == "reconciled" for r in rows if r["message_id"] in {u["message_id"] for u in unknown})
    # A rerun sends nothing: the ghosts were matched, not resent.
    again = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert again.attempts == 0
    records = assert_sandbox_matches_ledger(sandbox, rows)
    assert sum(r["ghost"] for r in records) == ghosts


def test_ghosted_transactional_messages_are_checked_against_provider_records_before_a_resend(
        sqlite_engine, sandbox, adapters):
    engine = sqlite_engine
    sandbox.configure(**QUIET, email={"ghost_rate": 0.3, "drop_rate": 0.2})
    ids = seed(engine, 80, purpose=Purpose.TRANSACTIONAL, preferred="email")
    run_id = plan(engine, ids, purpose=Purpose.TRANSACTIONAL, name="order", channels=(Channel.EMAIL,))
    rep = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY,
                     records=SandboxRecords(sandbox.url)).dispatch(run_id)
    faults = sandbox.stats()["faults"]["email"]
    assert faults["ghost"] >= 10 and faults["drop"] >= 5
    assert rep.outcomes["ambiguous_retry"] == faults["ghost"] + faults["drop"]
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": 80}
    # Ghosts were found in the provider's records and settled; dropped requests (never accepted) were resent.
    assert Counter(r["reason_code"] for r in rows)["reconciled"] == faults["ghost"]
    assert_sandbox_matches_ledger(sandbox, rows)


# ---------------------------------------------------------------------------------------------------------------------
# A 10,000-member campaign with a realistic mix.

# (share of members, preferred channels, consented channels, live push token, tweak, expected channel/state/code)
GROUPS = [
    ("email-first", 40, "email,sms,push", "email,sms,push", True, None, ("email", "sent", "sent")),
    ("push-first", 10, "push,email", "email,push", True, None, ("push", "sent", "sent")),
    ("stale-token", 5, "push,email", "email,push", True, "stale_token", ("email", "sent", "sent")),
    ("sms-first", 10, "sms,email", "sms,email", False, None, ("sms", "sent", "sent")),
    ("invalid-number", 5, "sms,email", "sms,email", False, "invalid_number", ("email", "sent", "sent")),
    ("stopped", 5, "sms,email", "sms,email", False, "stopped", (None, "failed", "permanent_failure")),
    ("no-consent", 5, "email,sms", "", False, None, (None, "skipped", "no_consent")),
    ("invalid-email", 5, "email", "email", False, "invalid_email", (None, "failed", "permanent_failure")),
    ("email-suppressed", 5, "email,sms", "email,sms", False, "suppress_email", ("sms", "sent", "sent")),
    ("push-no-device", 5, "push", "push", False, None, (None, "skipped", "no_reachable_channel")),
    ("all-suppressed", 5, "email", "email", False, "suppress_email", (None, "suppressed", "suppressed")),
]


def seed_population(engine, n):
    """Seed ``n`` members in the groups above; returns ``{member_id: group}`` and the STOP'ed numbers."""
    m, d, s = Member.__table__, Device.__table__, Suppression.__table__
    group_of: dict[int, tuple] = {}
    stopped: list[str] = []
    total = sum(g[1] for g in GROUPS)
    with engine.begin() as conn:
        for g in GROUPS:
            name, share, preferred, consent, push, tweak, _ = g
            ids = seed_members(conn, n * share // total, preferred=preferred, push=push,
                               consent=[(c, "marketing") for c in consent.split(",") if c], now=datetime.now(UTC))
            group_of.update(dict.fromkeys(ids, g))
            if tweak == "stale_token":
                conn.execute(sa.update(d).where(d.c.member_id.in_(ids)).values(token="stale-" + d.c.token))
            elif tweak == "invalid_number":  # E.164-shaped (routing accepts it) but not a real number: 21211
                conn.execute(sa.update(m).where(m.c.id.in_(ids)).values(phone="+8869" + sa.cast(m.c.id, sa.String)))
            elif tweak == "invalid_email":  # passes routing's shape check, SendGrid rejects it: 400
                conn.execute(sa.update(m).where(m.c.id.in_(ids)).values(email="m.." + sa.cast(m.c.id, sa.String)
                                                                       + "@example.test"))
            elif tweak == "stopped":
                stopped += list(conn.execute(sa.select(m.c.phone).where(m.c.id.in_(ids))).scalars())
            elif tweak == "suppress_email":
                emails = conn.execute(sa.select(m.c.email).where(m.c.id.in_(ids))).scalars()
                conn.execute(insert_for(conn, s), [dict(channel="email", address_hash=address_hash("email", e),
                                                        reason="hard_bounce", source="test") for e in emails])
    return group_of, stopped


@pytest.mark.slow
def test_ten_thousand_member_campaign_reaches_every_reachable_member_once_on_the_right_channel(
        sqlite_engine, sandbox, adapters):
    engine = sqlite_engine
    group_of, stopped = seed_population(engine, 10_000)
    sandbox.configure(**QUIET, twilio_opted_out=stopped)
    run_id = plan(engine, sorted(group_of))
    rep = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert rep.status == "completed"
    rows = ledger(engine, run_id)
    assert len(rows) == len(group_of)
    assert_sandbox_matches_ledger(sandbox, rows)
    wrong = Counter()
    for row in rows:
        name, *_, (channel, state, code) = group_of[row["member_id"]]
        if state != row["state"] or row["reason_code"] != code or (channel and row["channel"] != channel):
            wrong[(name, row["state"], row["channel"], row["reason_code"])] += 1
        assert row["reason"]
    assert not wrong, wrong
    by_group = {g[0]: [r for r in rows if group_of[r["member_id"]][0] == g[0]] for g in GROUPS}
    assert all("fallback because push failed permanently (unregistered_token" in r["reason"]
               for r in by_group["stale-token"])
    assert all("fallback because sms failed permanently (invalid_recipient" in r["reason"]
               for r in by_group["invalid-number"])
    assert all("opted_out" in r["reason"] and "does not allow a fallback" in r["reason"] for r in by_group["stopped"])
    assert all("no marketing consent" in r["reason"] for r in by_group["no-consent"])
    with engine.connect() as conn:
        stale = [r["member_id"] for r in by_group["stale-token"]]
        assert conn.execute(sa.select(sa.func.count()).where(Device.__table__.c.member_id.in_(stale),
                                                             Device.__table__.c.invalidated_at.is_(None))).scalar() == 0
        learned = Counter(conn.execute(sa.select(Suppression.__table__.c.reason)
                                       .where(Suppression.__table__.c.source.like("dispatch:%"))).scalars())
    n = len(by_group["stopped"])
    assert learned == {"unsubscribe": n, "invalid": len(by_group["invalid-number"]) + len(by_group["invalid-email"])}


# ---------------------------------------------------------------------------------------------------------------------
# Dispatchers in subprocesses: the crash test and concurrent dispatchers on PostgreSQL.

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from datetime import timedelta
    from channels.registry import build_channels
    from membercare.db import make_engine
    from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
    from membercare.delivery.policies import PolicySettings

    url, run_id, lease_s, worker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    cfg = DispatchConfig(workers=24, batch_size=150, flush_interval=0.05, backoff_base=0.05, backoff_max=0.5,
                         wait_for_deferred=10.0, lease=timedelta(seconds=lease_s), error_min_samples=10_000)
    adapters = build_channels(os.environ)
    rep = Dispatcher(make_engine(url), adapters, config=cfg, worker_id=worker,
                     policy=PolicySettings(marketing_cap=None, quiet_hours=None)).dispatch(run_id, resume=True)
    print(json.dumps({"sent": rep.outcomes["sent"], "status": rep.status}))
    """
)


def child_env(sandbox, service_account):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update(env_for(sandbox, service_account))
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_sigkilled_dispatchers_leave_zero_duplicates_and_every_message_settled(
        sqlite_url, sandbox, service_account, tmp_path):
    engine = make_engine(sqlite_url)
    sandbox.configure(**QUIET)
    ids = []
    for preferred in ("email,sms,push", "sms,push,email", "push,email,sms"):
        ids += seed(engine, 10_000 // 3 + (1 if preferred.startswith("email") else 0), preferred=preferred)
    run_id = plan(engine, ids)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = child_env(sandbox, service_account)
    rnd = random.Random(5)
    kills = 0
    for i in range(4):
        # lease 0: each new dispatcher turns the dead one's in-flight rows into unknown right away.
        p = subprocess.Popen([sys.executable, str(script), sqlite_url, str(run_id), "0", f"crash{i}"], env=env,
                             stdout=subprocess.DEVNULL)
        try:
            p.wait(timeout=rnd.uniform(2.0, 4.5))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
    assert kills >= 3, "the run finished before it could be killed: raise n or shorten the kill times"
    recover_stale(engine, lease=timedelta(0), run_id=run_id)
    report = reconcile_unknown(engine, run_id=run_id, records=SandboxRecords(sandbox.url), grace=timedelta(0))
    done = subprocess.run([sys.executable, str(script), sqlite_url, str(run_id), "300", "final"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = ledger(engine, run_id)
    states = Counter(r["state"] for r in rows)
    assert len(rows) == len(ids) and states["sent"] > 0
    assert set(states) <= {"sent", "unknown"}, states  # every message terminal, or unknown with a reason
    assert_sandbox_matches_ledger(sandbox, rows)
    unknown = [r for r in rows if r["state"] == "unknown"]
    # Unknown rows are exactly those that never reached the provider (no record); each says why.
    assert all(r["reason_code"] == "unknown_not_resent" and "not resent" in r["reason"] for r in unknown)
    assert len(unknown) == report.left_unknown
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("purpose", [Purpose.MARKETING, Purpose.TRANSACTIONAL])
def test_twenty_percent_transient_faults_and_429s_every_message_accepted_exactly_once(
        sqlite_engine, sandbox, adapters, purpose):
    engine = sqlite_engine
    if purpose == Purpose.MARKETING:
        # Faults the provider itself reports (500/503): never ambiguous, so marketing retries them.
        faults = {"error_rate": 0.2}
    else:
        # Also requests whose answer never comes (held past the client timeout, dropped, ghosts): ambiguous,
        # so transactional retries them after checking the provider's records: ghosts are settled, the
        # rest resent.
        faults = {"error_rate": 0.1, "timeout_rate": 0.03, "drop_rate": 0.04, "ghost_rate": 0.03}
    limits = {"email": 400.0, "sms": 150.0, "push": 300.0}
    sandbox.configure(**QUIET, timeout_hold_s=2.0,
                      **{ch: {**faults, "rate_limit": limits[ch], "burst": 20} for ch in limits})
    ids = []
    for preferred in ("email,sms,push", "sms,push,email", "push,email,sms"):
        ids += seed(engine, 700, purpose=purpose, preferred=preferred)
    run_id = plan(engine, ids, purpose=purpose, name=f"faults-{purpose.value}")
    from dataclasses import replace

    from channels.registry import adapter_for, close_channels, config_from_env

    # Transactional: a client timeout shorter than the sandbox's hold, so held requests time out (ambiguous).
    # Marketing keeps the default timeout: a slow answer there would rightly end as unknown, not resent.
    env = env_for(sandbox, sandbox.service_account_path)
    own = ({ch: adapter_for(replace(config_from_env(ch, env), timeout_s=1.2)) for ch in ALL}
           if purpose == Purpose.TRANSACTIONAL else {})
    try:
        cfg = DispatchConfig(**{**FAST.__dict__, "max_transient_failures": 30, "wait_for_deferred": 30.0})
        rep = Dispatcher(engine, own or adapters, config=cfg, policy=NOPOLICY,
                         records=SandboxRecords(sandbox.url)).dispatch(run_id)
    finally:
        close_channels(own)
    if purpose == Purpose.TRANSACTIONAL:
        assert rep.outcomes["ambiguous_retry"] > 0 and rep.outcomes["reconciled"] > 0
    stats = sandbox.stats()
    assert sum(stats["throttled"].values()) > 0 and rep.outcomes["throttled"] > 0
    assert sum(sum(f.values()) for f in stats["faults"].values()) > 0.15 * len(ids)
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": len(ids)}
    assert_sandbox_matches_ledger(sandbox, rows)
    assert stats["accepted_total"] == len(ids)


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_dispatcher_processes_on_postgres_send_each_message_once(pg_url, sandbox, service_account,
                                                                            tmp_path):
    engine = make_engine(pg_url)
    sandbox.configure(**QUIET)
    ids = []
    for preferred in ("email,sms,push", "sms,push,email", "push,email,sms"):
        ids += seed(engine, 1000, preferred=preferred)
    run_id = plan(engine, ids)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = child_env(sandbox, service_account)
    procs = [subprocess.Popen([sys.executable, str(script), pg_url, str(run_id), "300", f"pg{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    sent = [json.loads(o[0].strip().splitlines()[-1])["sent"] for o in outs]
    assert sum(sent) == len(ids) and sum(1 for s in sent if s > 0) >= 2  # the work was actually shared
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": len(ids)}
    assert_sandbox_matches_ledger(sandbox, rows)
    engine.dispose()
