"""Scale-out, end to end: ``membercare stack up`` (a Prefect server on PostgreSQL, two process workers, the
receiver), a campaign fanned out to ``dispatch-run`` flow runs on both workers through the provider sandbox with a
shared SMS rate limit, one worker killed mid-run (with its flow runs, as a lost host) and the other finishing.

Asserted from outside the stack: no duplicate (the sandbox's accepted message ids against the ledger), none lost
(every planned row sent or settled with a reason), the shared SMS limit held (the sandbox's accepted times: at most
``rate x T + burst`` in any window T, the bucket's bound, plus the loopback jitter tests/test_rate_limits.py
allows), and the runs, logs and artifacts visible through the Prefect API.

Sizes: ``MEMBERCARE_STACK_E2E_MEMBERS`` (default 20,000) and ``MEMBERCARE_STACK_E2E_SMS_RATE`` (SMS/s, default 100).
Needs ``MEMBERCARE_TEST_POSTGRES_URL``: the shop and the Prefect server each get a fresh database on that server,
dropped at the end whatever happens (as are the stack's processes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from flows.ratelimits import burst_for
from membercare.cli.stack import signal_tree
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for
from test_rate_limits import max_in_window

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = int(os.environ.get("MEMBERCARE_STACK_E2E_MEMBERS", "20000"))
SMS_RATE = float(os.environ.get("MEMBERCARE_STACK_E2E_SMS_RATE", "100"))
LEASE_S = 15.0
FAN_OUT = 3
CAMPAIGN_DEPLOYMENT = "run-campaign/birthday"  # any campaign deployment: the parameters name the campaign


def _say(msg: str) -> None:
    print(f"[stack-e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Databases:
    """Fresh databases on the test server, dropped (forcibly) by ``drop_all``."""

    def __init__(self, server_url: str):
        from membercare.db import make_engine

        self.admin = make_engine(server_url)
        self.names: list[str] = []

    def create(self, prefix: str) -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        with self.admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return name

    def url(self, name: str) -> str:
        return self.admin.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name in self.names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.dispose()


def _shop(url: str) -> None:
    from bench.e2e.harness import shop_as_of
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine, upgrade
    from membercare.delivery.policies import PolicySettings, save_policy

    upgrade(url)
    engine = make_engine(url)
    try:
        generate_shop(engine, members=MEMBERS, seed=7, as_of=shop_as_of())
        with engine.begin() as conn:
            # No quiet hours: the outcome must not depend on the wall-clock hour the test runs at.
            save_policy(conn, PolicySettings(quiet_hours=None))
    finally:
        engine.dispose()


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "membercare.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _wait(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _parent(pid: int) -> int | None:
    from membercare.cli.stack import _parent

    return _parent(pid)


class Api:
    """The stack's Prefect API, read from outside (as the UI does)."""

    def __init__(self, api_url: str):
        from prefect.client.orchestration import SyncPrefectClient

        self.client = SyncPrefectClient(api_url)
        self.client.__enter__()

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    def flow_runs(self, flow_name: str):
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        return self.client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))

    def run_deployment(self, name: str, parameters: dict):
        dep = self.client.read_deployment_by_name(name)
        return self.client.create_flow_run_from_deployment(dep.id, parameters=parameters)

    def state(self, flow_run_id):
        return self.client.read_flow_run(flow_run_id).state

    def wait_final(self, flow_run_id, timeout: float, what: str):
        return _wait(lambda: (s := self.state(flow_run_id)) is not None and s.is_final() and s, timeout, what)


def _sent_ids(db_url: str, run_id: int) -> list[str]:
    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage

    engine = make_engine(db_url)
    o = OutboxMessage.__table__
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(o.c.message_id).where(o.c.run_id == run_id, o.c.state == "sent"))
                        .scalars())
    finally:
        engine.dispose()


def _per_worker(api: Api, run_owner: dict, victim: str, survivor: str, total_sent: int) -> Counter:
    """Messages sent per worker: each finished dispatch-run logs its own count (flows/dispatch.py); a run not seen
    running before the kill ran on the survivor (the only worker left); what the finished runs do not account
    for was sent by the killed worker's runs (settled from the provider's records)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    split: Counter = Counter()
    for fr in api.flow_runs("dispatch-run"):
        logs = api.client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
        for rec in logs:
            m = re.search(r"dispatch-run on run \d+: sent (\d+)", rec.message)
            if m:
                split[run_owner.get(fr.id, survivor)] += int(m.group(1))
    split[victim] += total_sent - sum(split.values())
    return split


def _states(db_url: str, run_id: int) -> dict[str, int]:
    from membercare.db import make_engine
    from membercare.delivery.models import Decision, OutboxMessage

    engine = make_engine(db_url)
    o = OutboxMessage.__table__
    try:
        with engine.connect() as conn:
            states = dict(conn.execute(sa.select(o.c.state, sa.func.count()).where(o.c.run_id == run_id)
                                       .group_by(o.c.state)).all())
            unexplained = conn.execute(sa.select(sa.func.count()).select_from(o).where(
                o.c.run_id == run_id, o.c.state != "sent", o.c.reason_code.is_(None))).scalar_one()
            # Marketing rows whose call may have begun when their worker died and that the provider's records do
            # not show: settled as unknown, not resent (docs/delivery.md: no duplicate over no loss).
            not_resent = conn.execute(sa.select(sa.func.count()).select_from(o).where(
                o.c.run_id == run_id, o.c.state == "unknown",
                o.c.reason_code == Decision.UNKNOWN_NOT_RESENT.value)).scalar_one()
    finally:
        engine.dispose()
    return {**states, "_settled_without_reason": unexplained, "_unknown_not_resent": not_resent}


def _claims_under(db_url: str, run_id: int, ancestor: int) -> int:
    """Rows of the run claimed right now by dispatcher processes descending from process ``ancestor`` (claims
    name their process: ``host:pid:tag/...``)."""
    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage

    engine = make_engine(db_url)
    o = OutboxMessage.__table__
    try:
        with engine.connect() as conn:
            claims = conn.execute(sa.select(o.c.claimed_by, sa.func.count()).where(
                o.c.run_id == run_id, o.c.state == "sending").group_by(o.c.claimed_by)).all()
    finally:
        engine.dispose()
    total = 0
    for claim, n in claims:
        pid: int | None = int(str(claim).split("/", 1)[0].split(":")[1])
        for _ in range(6):  # dispatcher -> flow-run process -> worker, a level or two of wrappers between
            if pid is None or pid == ancestor:
                break
            pid = _parent(pid)
        total += n if pid == ancestor else 0
    return total


def _run_id(db_url: str) -> int | None:
    from membercare.db import make_engine
    from membercare.delivery.models import CampaignRun

    engine = make_engine(db_url)
    r = CampaignRun.__table__
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(r.c.id).where(r.c.campaign == "bench_daily")).scalar()
    finally:
        engine.dispose()


def test_campaign_fans_out_to_two_workers_survives_losing_one_and_sends_each_message_once(sandbox, service_account,
                                                                                           tmp_path):
    server_url = os.environ.get("MEMBERCARE_TEST_POSTGRES_URL")
    if not server_url:
        pytest.skip("needs MEMBERCARE_TEST_POSTGRES_URL (a PostgreSQL server)")
    from bench.e2e.harness import SHOP_DATE, bench_templates

    started = time.monotonic()
    dbs = Databases(server_url)
    state = tmp_path / "stack"
    api: Api | None = None
    env: dict[str, str] = {}
    try:
        shop_db = dbs.url(dbs.create("mc_stack_shop"))
        prefect_db = dbs.create("mc_stack_prefect")
        _shop(shop_db)
        _say(f"shop of {MEMBERS:,} members generated ({time.monotonic() - started:.0f} s)")
        # No engagement webhooks (this test is about sending); nothing retries posts to the unused callback URL.
        sandbox.configure(engagement={ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")},
                          webhook_max_attempts=1)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMBERCARE_", "PREFECT_"))}
        env.update(env_for(sandbox, service_account))
        env.update({"MEMBERCARE_DATABASE_URL": shop_db, "MEMBERCARE_HOME": str(tmp_path / "home"),
                    "MEMBERCARE_TEMPLATES_DIR": str(bench_templates(tmp_path, ROOT / "templates")),
                    "MEMBERCARE_NO_SECRET_BLOCKS": "1", "MEMBERCARE_SECRET_KEY": secrets.token_urlsafe(32),
                    "MEMBERCARE_RATE_LIMIT_SMS": f"{SMS_RATE:g}", "MEMBERCARE_RATE_LIMIT_EMAIL": "100000",
                    "MEMBERCARE_RATE_LIMIT_PUSH": "100000", "MEMBERCARE_DISPATCH_LEASE_SECONDS": f"{LEASE_S:g}",
                    "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"})
        up = _cli(["stack", "up", "--workers", "2", "--postgres", server_url, "--database", prefect_db,
                   "--state-dir", str(state), "--worker-limit", "2", "--deployment", "birthday",
                   "--deployment", "dispatch-run", "--deployment", "sync-engagement"], env, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        stack = json.loads((state / "stack.json").read_text())
        workers = {c["pid"]: c["name"] for c in stack["components"] if c["name"].startswith("worker-")}
        _say(f"stack up: {stack['ui_url']} ({time.monotonic() - started:.0f} s)")
        api = Api(stack["api_url"])
        _exercise(api, stack, workers, sandbox, shop_db, SHOP_DATE, started)
    finally:
        if api is not None:
            api.close()
        if state.exists():
            down = _cli(["stack", "down", "--state-dir", str(state)], env or dict(os.environ), timeout=180)
            _say(f"stack down: {down.stdout.strip()} {down.stderr.strip()}")
        dbs.drop_all()


def _exercise(api: Api, stack: dict, workers: dict[int, str], sandbox, shop_db: str, shop_date, started: float):
    params = {"campaign": "bench_daily", "as_of": shop_date.isoformat(), "occurrence_tag": "stack",
              "fan_out": FAN_OUT, "wait_for_deferred_s": 0}
    campaign = api.run_deployment(CAMPAIGN_DEPLOYMENT, {"params": params})
    owner: dict[int, str] = {}  # flow-run process pid -> the worker that started it (its parent)
    run_owner: dict = {}  # flow run id -> worker
    dispatching: set[str] = set()  # workers running a dispatch-run

    def note_owners() -> None:
        for flow_name in ("dispatch-run", "run-campaign"):
            for fr in api.flow_runs(flow_name):
                if fr.infrastructure_pid and fr.state and fr.state.is_running():
                    pid = int(str(fr.infrastructure_pid).rsplit(":", 1)[-1])
                    parent = _parent(pid)
                    if parent in workers:
                        owner[pid] = run_owner[fr.id] = workers[parent]
                        if flow_name == "dispatch-run":
                            dispatching.add(workers[parent])

    run_id = _wait(lambda: _run_id(shop_db), 600, "the campaign run to be planned")

    def victim_worker() -> int | None:
        """The worker that does not run the campaign flow (the one to lose), once that is known."""
        pid = api.client.read_flow_run(campaign.id).infrastructure_pid
        run_by = owner.get(int(str(pid).rsplit(":", 1)[-1])) if pid else None
        return next((p for p, n in workers.items() if n != run_by), None) if run_by else None

    def both_dispatching() -> bool:
        note_owners()
        if len(dispatching) < 2 or sandbox.stats()["accepted_total"] < MEMBERS * 0.15:
            return False
        # The victim must be sending when it dies (its dispatchers hold claims), else the kill tests nothing.
        victim = victim_worker()
        return victim is not None and _claims_under(shop_db, run_id, victim) > 0

    _wait(both_dispatching, 600, "dispatch-run flow runs on both workers, the victim's sending", poll=0.5)
    victim_pid = victim_worker()
    assert victim_pid is not None
    survivor = next(n for p, n in workers.items() if p != victim_pid)
    sent_at_kill = sandbox.stats()["accepted_total"]
    signal_tree(victim_pid, signal.SIGKILL)  # a lost host: the worker and its flow runs, no goodbye
    _say(f"killed {workers[victim_pid]} after {sent_at_kill:,} accepted messages ({time.monotonic() - started:.0f} s)")

    def campaign_done():
        note_owners()  # the sweep's dispatch-run, on the survivor
        s = api.state(campaign.id)
        return s is not None and s.is_final() and s

    state = _wait(campaign_done, 900, "the campaign flow run to finish")
    assert state.is_completed(), state.message
    # The lost worker's runs stop sending heartbeats: the stack's automation marks them Crashed (not "Running"
    # for ever). Proactive triggers fire 90 s after the last heartbeat, evaluated every few seconds.
    victim_runs = [fr for fr, w in run_owner.items() if w == workers[victim_pid]]
    assert victim_runs, "the killed worker ran no flow run we saw"
    # Runs it finished before the kill are Completed; the ones it was running must not stay Running.
    _wait(lambda: all((s := api.state(fr)) is not None and s.is_final() for fr in victim_runs), 300,
          "the killed worker's flow runs to be marked Crashed")
    crashed = sum(api.state(fr).is_crashed() for fr in victim_runs)
    assert crashed, "none of the killed worker's flow runs was marked Crashed"
    _say(f"{crashed} flow run(s) of the killed worker marked Crashed ({time.monotonic() - started:.0f} s)")
    # Rows the dead dispatchers may have handed to the provider are unknown: the provider's records settle them.
    sync = api.run_deployment("sync-engagement/sync-engagement",
                              {"records_url": sandbox.url, "grace_minutes": 0.0, "lease_minutes": LEASE_S / 60,
                               "attribution_days": 0.0})
    assert api.wait_final(sync.id, 300, "sync-engagement").is_completed()
    states = _states(shop_db, run_id)
    if states.get("planned"):  # rows the provider confirmed it never received go out again
        again = api.run_deployment("dispatch-run/dispatch-run", {"run_id": run_id})
        assert api.wait_final(again.id, 300, "the resend dispatch-run").is_completed()
        states = _states(shop_db, run_id)
    wall = time.monotonic() - started
    _check(api, stack, sandbox, shop_db, run_id, states, campaign.id, run_owner, (workers[victim_pid], survivor), wall)


def _check(api: Api, stack, sandbox, shop_db, run_id, states, campaign_id, run_owner, killed: tuple[str, str], wall):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    ids = _sent_ids(shop_db, run_id)
    records = [m for m in sandbox.messages() if not m.get("ghost")]
    accepted = Counter(m["message_id"] for m in records)
    stats = sandbox.stats()
    sms = [datetime.fromisoformat(m["accepted_at"]).timestamp() for m in records if m["channel"] == "sms"]
    victim, survivor = killed
    per_worker = _per_worker(api, run_owner, victim, survivor, len(ids))
    burst = burst_for(SMS_RATE)  # the global limit's slots
    figures = {"members": MEMBERS, "rows": sum(v for k, v in states.items() if not k.startswith("_")),
               "states": states, "sent": len(ids), "sandbox_accepted": len(records), "per_worker": dict(per_worker),
               "killed": victim, "sms": len(sms), "sms_rate": SMS_RATE,
               "sms_max_1s": max_in_window(sms, 1.0), "sms_max_5s": max_in_window(sms, 5.0),
               "duplicates": sum(1 for n in accepted.values() if n > 1)
               + stats["duplicates_by_message_id_total"] + stats["duplicates_by_idempotency_key_total"],
               "missing_at_sandbox": len(set(ids) - set(accepted)), "unknown_to_ledger": len(set(accepted) - set(ids)),
               "wall_s": round(wall, 1)}
    _say("figures: " + json.dumps(figures))
    # No duplicate: each message id once at the provider, and exactly the ledger's sent rows.
    assert figures["duplicates"] == 0
    assert figures["missing_at_sandbox"] == 0 and figures["unknown_to_ledger"] == 0
    # None lost: every planned row is sent or settled with a reason: nothing left planned, deferred or sending,
    # and the only unknown rows are those settled by policy (the provider's records, read above, have none of them).
    assert not {"planned", "sending", "deferred"} & {k for k, v in states.items() if v}
    assert states["_settled_without_reason"] == 0
    assert states.get("unknown", 0) == states["_unknown_not_resent"]
    # Both workers sent; the survivor finished.
    assert len([w for w, n in per_worker.items() if w.startswith("worker-") and n > 0]) == 2, per_worker
    # The shared SMS limit: a token bucket admits at most rate x T + burst in a window T; plus 0.25 s worth of
    # loopback jitter (the sandbox stamps acceptance after the request crossed the loopback, as in
    # tests/test_rate_limits.py) and one chunk per dispatcher of slots taken just before the window.
    chunks = FAN_OUT * max(1, round(SMS_RATE / 10))
    assert figures["sms"] > 0
    assert figures["sms_max_1s"] <= SMS_RATE * 1.25 + burst + chunks
    assert figures["sms_max_5s"] <= SMS_RATE * 5.25 + burst + chunks
    # Visible through the Prefect API: the runs, their logs and the campaign's artifacts.
    runs = api.flow_runs("dispatch-run")
    assert len(runs) >= FAN_OUT and sum(1 for r in runs if r.state and r.state.is_completed()) >= 1
    logs = api.client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[campaign_id])))
    assert any("dispatch-run flow runs started" in rec.message for rec in logs)
    arts = api.client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[campaign_id])))
    assert {"table", "markdown"} <= {a.type for a in arts}
    assert stack["ui_url"].startswith("http://127.0.0.1:")
    # The UI in a browser finds the API it is served with (not Prefect's default 127.0.0.1:4200).
    assert httpx.get(stack["ui_url"] + "/ui-settings", timeout=10).json()["api_url"] == stack["api_url"]
