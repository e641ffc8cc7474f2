"""Several dispatcher *processes* on one run (membercare.delivery.pool): exactly once through the real SDKs,
rate limits split between processes, errors surfaced, and the crash guarantee with one of two concurrent
processes SIGKILLed mid-run; on SQLite and PostgreSQL (``db_url`` is parametrised over both)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import timedelta

import pytest

from membercare.db import make_engine
from membercare.delivery.dispatcher import DispatchConfig
from membercare.delivery.policies import save_policy
from membercare.delivery.pool import DispatchProcessError, dispatch_processes, merge_reports, split_rates
from membercare.delivery.reconcile import StaticRecords, reconcile_unknown, recover_stale
from membercare.errors import ConfigurationError, InputError
from sandbox_fixtures import *  # noqa: F403
from test_delivery_e2e import NOPOLICY, QUIET, assert_sandbox_matches_ledger, child_env, ledger, plan, seed


def test_rates_are_split_so_that_processes_together_keep_the_limit():
    assert split_rates({"sms": 10.0, "email": 90.0, "push": 0}, 2) == {"sms": 5.0, "email": 45.0}
    with pytest.raises(InputError, match="between 1 and 16"):
        dispatch_processes("sqlite://", 1, 0)


@pytest.mark.slow
def test_two_processes_share_a_run_through_the_real_sdks_each_message_once(db_url, sandbox, service_account):
    engine = make_engine(db_url)
    # Enough provider latency that the second process is up before the first could finish alone.
    sandbox.configure(**QUIET, **{ch: {"latency_ms": 40.0} for ch in ("email", "sms", "push")})
    ids = []
    for preferred in ("email,sms,push", "sms,push,email", "push,email,sms"):
        ids += seed(engine, 80, preferred=preferred)
    run_id = plan(engine, ids)
    with engine.begin() as conn:  # the processes read the stored policy: no quiet hours at any test time
        save_policy(conn, NOPOLICY)
    cfg = DispatchConfig(workers=4, batch_size=20, flush_interval=0.05, error_min_samples=10_000,
                         rate_limits={"sms": 400.0})
    reports = dispatch_processes(db_url, run_id, 2, env=child_env(sandbox, service_account), config=cfg)
    assert len(reports) == 2 and len({r["worker"] for r in reports}) == 2
    assert all(r["outcomes"].get("sent", 0) > 0 for r in reports), reports  # the work was actually shared
    merged = merge_reports(reports)
    assert merged["outcomes"] == {"sent": 240} and merged["attempts"] == 240
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": 240}
    assert_sandbox_matches_ledger(sandbox, rows)  # zero duplicates by message id and idempotency key
    engine.dispose()


def test_configuration_errors_of_the_processes_are_raised(sqlite_url, sandbox, service_account):
    engine = make_engine(sqlite_url)
    run_id = plan(engine, seed(engine, 5))
    env = {k: v for k, v in child_env(sandbox, service_account).items() if k != "MEMBERCARE_TWILIO_AUTH_TOKEN"}
    with pytest.raises(ConfigurationError, match="MEMBERCARE_TWILIO_AUTH_TOKEN"):
        dispatch_processes(sqlite_url, run_id, 2, env=env)
    # A process that cannot even start is reported, not ignored.
    with pytest.raises(DispatchProcessError, match="without a report"):
        dispatch_processes(sqlite_url, run_id, 1, env=child_env(sandbox, service_account), python="/bin/false")
    engine.dispose()


# ---------------------------------------------------------------------------------------------------------------------
# Crash test: two dispatcher processes on one run at once, one SIGKILLed at a random point of progress.

CHILD = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from fakes import FakeAdapter
    from membercare.db import make_engine
    from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
    from membercare.delivery.policies import PolicySettings

    url, run_id, record, lease_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    ads = {ch: FakeAdapter(ch, latency=0.003, record_path=record) for ch in ("email", "sms", "push")}
    cfg = DispatchConfig(workers=6, batch_size=30, flush_interval=0.05, lease=timedelta(seconds=lease_s))
    Dispatcher(make_engine(url), ads, config=cfg, policy=PolicySettings(marketing_cap=None, quiet_hours=None)
               ).dispatch(run_id, resume=True)
    """
)


@pytest.mark.slow
def test_one_of_two_concurrent_processes_sigkilled_never_duplicates_and_leaves_nothing_unaccounted(
        db_url, tmp_path):
    from test_dispatch import plan as plan_fake
    from test_dispatch import states

    engine = make_engine(db_url)
    n = 1200
    run_id = plan_fake(engine, n)
    script, record = tmp_path / "child.py", tmp_path / "accepted.log"
    script.write_text(CHILD)
    # The child imports the test doubles (tests/fakes.py) as the tests do.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}

    def accepted() -> int:
        return len(record.read_text().splitlines()) if record.exists() else 0

    def start(lease_s: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), db_url, str(run_id), str(record), lease_s], env=env)

    # Both live at once with the normal lease: the survivor must not take the victim's in-flight rows, and
    # finishes everything else.
    victim, survivor = start("300"), start("300")
    target = random.Random(3).randint(200, 500)
    deadline = time.monotonic() + 60
    while victim.poll() is None and accepted() < target and time.monotonic() < deadline:
        time.sleep(0.002)
    killed = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=120) == 0
    assert killed, "the victim finished before it could be killed"
    held = states(engine, run_id)["sending"]  # the victim's in-flight rows, left to the lease
    # The dead processes' in-flight rows: unknown, then settled from the provider's records.
    recover_stale(engine, lease=timedelta(0), run_id=run_id)
    lines = record.read_text().splitlines()
    reconcile_unknown(engine, run_id=run_id, records=StaticRecords({ln.split()[0]: ln.split()[2] for ln in lines}),
                      grace=timedelta(0))
    final = subprocess.run([sys.executable, str(script), db_url, str(run_id), str(record), "300"], env=env,
                           timeout=120)
    assert final.returncode == 0
    keys = Counter(ln.split()[1] for ln in record.read_text().splitlines())
    assert not [k for k, c in keys.items() if c > 1], "duplicate sends"
    st = states(engine, run_id)
    assert st["sending"] == st["planned"] == st["deferred"] == 0
    assert st["sent"] == len(keys) == n - st["unknown"]
    assert st["unknown"] <= held  # only rows in flight at the kill can be unknown (never reached the provider)
    engine.dispose()
