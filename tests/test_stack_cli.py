"""``membercare stack``: the parts that need no server (URLs, an empty state directory, signalling only what it
started). The whole stack runs in tests/test_stack_e2e.py (slow)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from clirun import run_cli
from membercare.cli import stack
from membercare.errors import InputError


def test_prefect_gets_an_asyncpg_url_to_its_own_database_on_the_given_server():
    url = stack.prefect_database_url("postgresql://postgres:pw@127.0.0.1:5432/test", "membercare_prefect")
    assert url == "postgresql+asyncpg://postgres:pw@127.0.0.1:5432/membercare_prefect"
    assert stack.prefect_database_url("postgresql+psycopg://u@h/x", "p").startswith("postgresql+asyncpg://u@h/p")
    with pytest.raises(InputError, match="PostgreSQL"):
        stack.prefect_database_url("sqlite:///x.db", "p")


def test_status_and_down_without_a_stack_say_so(tmp_path):
    status = run_cli("stack", "status", "--state-dir", str(tmp_path / "none"), home=tmp_path)
    assert status.returncode == 1 and "no stack recorded" in status.stdout
    down = run_cli("stack", "down", "--state-dir", str(tmp_path / "none"), home=tmp_path)
    assert down.returncode == 0 and "no stack recorded" in down.stderr


def test_down_stops_a_recorded_process_group_with_its_children_and_never_a_reused_pid(tmp_path):
    # A leader in its own session with a child in another session (as a process worker starts its flow runs).
    child_code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; " \
                 "time.sleep(60)'], start_new_session=True); time.sleep(60)"
    comp = stack._spawn(tmp_path, "worker-1", [sys.executable, "-c", child_code], env={})
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not stack.descendants(comp.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        kids = stack.descendants(comp.pid)
        assert len(kids) == 1
        # A pid file whose start time does not match (the pid was reused) is not signalled.
        fake = stack.Component("other", stranger.pid, "1", str(tmp_path / "x.log"))
        assert stack.stop_component(fake, tmp_path) == "not running" and stranger.poll() is None
        assert stack.stop_component(comp, tmp_path) in ("stopped", "killed")
        deadline = time.monotonic() + 10
        while stack._start_time(kids[0]) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack._start_time(kids[0]) is None  # the child in its own session is gone too
        assert not (tmp_path / "worker-1.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()
