"""``membercare demo`` end to end, as a new user runs it: a subprocess on a fresh MEMBERCARE_HOME (SQLite,
Prefect's local ephemeral mode, the provider sandbox and the receiver on loopback), then a second run the
same day, which must send nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.slow, pytest.mark.prefect]
ROOT = Path(__file__).resolve().parent.parent
# The demo command is registered by membercare.cli._register; import it explicitly so this test does not
# depend on that line.
CODE = "import sys, membercare.cli as c, membercare.cli.demo; c.main(sys.argv[1:])"


def run_demo(home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEMBERCARE_"))}
    env.update(MEMBERCARE_HOME=str(home), COLUMNS="160", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", CODE, "demo", "--members", "500", "--seed", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)


def test_demo_runs_the_day_and_a_second_run_sends_nothing(tmp_path):
    home = tmp_path / "home"
    first = run_demo(home)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "generated a demo shop of 500 members" in out
    assert "Today's lifecycle campaigns" in out and "birthday" in out and "churn_winback" in out
    assert "messages accepted by the sandbox providers" in out
    assert "message gallery:" in out and (home / "gallery" / "index.html").is_file()
    assert "HTML report:" in out
    assert f"PREFECT_HOME={home / 'prefect'} prefect server start" in out
    assert (home / "prefect" / "prefect.db").is_file(), "the runs must be kept for the Prefect UI"
    assert (home / "secret_key").is_file() and oct((home / "secret_key").stat().st_mode)[-3:] == "600"

    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage

    engine = make_engine(f"sqlite:///{home / 'membercare.db'}")
    o = OutboxMessage.__table__
    with engine.connect() as conn:
        sent_before = conn.execute(sa.select(sa.func.count()).where(o.c.state == "sent")).scalar_one()
        rows_before = conn.execute(sa.select(sa.func.count()).select_from(o)).scalar_one()
        # What each sent row was sent as: a resend would replace the provider id and the send time.
        sends_before = set(conn.execute(
            sa.select(o.c.id, o.c.provider_message_id, o.c.sent_at).where(o.c.state == "sent")).all())
    assert sent_before > 0

    second = run_demo(home)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "using the existing demo shop (500 members)" in second.stdout
    assert "nothing sent twice" in second.stdout
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(o)).scalar_one() == rows_before
        assert conn.execute(sa.select(sa.func.count()).where(o.c.state == "sent")).scalar_one() >= sent_before
        # (A row may legitimately carry attempts > 1: a throttled or 5xx answer retried before acceptance.)
        sends_after = set(conn.execute(
            sa.select(o.c.id, o.c.provider_message_id, o.c.sent_at).where(o.c.state == "sent")).all())
        assert sends_before <= sends_after, "the second run resent messages the first run had sent"
    engine.dispose()
