"""``membercare demo`` end to end, as a new user runs it: a subprocess on a fresh MEMBERCARE_HOME (SQLite,
Prefect's local ephemeral mode, the provider sandbox and the receiver on loopback), then a second run the
same day, which must send nothing. Both runs happen at ``clock.FROZEN_NOW`` (tests/clock.py), whatever the
hour and the date the test runs at."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from clock import FROZEN_NOW, env_with_clock_at

pytestmark = [pytest.mark.slow, pytest.mark.prefect]
ROOT = Path(__file__).resolve().parent.parent
# The demo command is registered by membercare.cli._register; import it explicitly so this test does not
# depend on that line.
CODE = "import sys, membercare.cli as c, membercare.cli.demo; c.main(sys.argv[1:])"


def demo_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEMBERCARE_"))}
    env.update(MEMBERCARE_HOME=str(home), COLUMNS="160", PYTHONUNBUFFERED="1")
    # The demo runs "today" by the wall clock. Its clock starts at a chosen instant and runs on (the second run
    # continues where the first ended), so both runs are on the same day in Asia/Taipei whenever the test runs:
    # a second run on the next day would rightly send the next day's campaigns. The demo's own children
    # (Prefect's server, the services) inherit the clock.
    return env_with_clock_at(env, FROZEN_NOW)


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CODE, "demo", "--members", "500", "--seed", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)


def test_demo_runs_the_day_and_a_second_run_sends_nothing(tmp_path):
    home = tmp_path / "home"
    env = demo_env(home)
    first = run_demo(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "generated a demo shop of 500 members" in out
    assert "Today's lifecycle campaigns" in out and "birthday" in out and "churn_winback" in out
    assert "messages accepted by the sandbox providers" in out
    assert "message gallery:" in out and (home / "gallery" / "index.html").is_file()
    assert "HTML report:" in out
    assert "membercare ui" in out and "prefect server start" not in out
    assert "send_telemetry_heartbeat" not in first.stderr  # no telemetry error lines
    # The project configuration: the other commands in this folder use the demo's database and secret key.
    config = home / "config.toml"
    assert config.is_file() and oct(config.stat().st_mode)[-3:] == "600" and "project configuration:" in out
    text = config.read_text(encoding="utf-8")
    assert "MEMBERCARE_DATABASE_URL" in text and "PREFECT_HOME" in text and (home / "secret_key").read_text(
        encoding="utf-8").strip() not in text
    assert (home / "prefect" / "prefect.db").is_file(), "the runs must be kept for the Prefect UI"
    assert (home / "secret_key").is_file() and oct((home / "secret_key").stat().st_mode)[-3:] == "600"

    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage

    engine = make_engine(f"sqlite:///{home / 'membercare.db'}")
    o = OutboxMessage.__table__
    with engine.connect() as conn:
        sent_before = conn.execute(sa.select(sa.func.count()).where(o.c.state == "sent")).scalar_one()
        rows_before = set(conn.execute(sa.select(o.c.campaign, o.c.occurrence, o.c.member_id, o.c.id)).all())
        # What each sent row was sent as: a resend would replace the provider id and the send time.
        sends_before = set(conn.execute(
            sa.select(o.c.id, o.c.provider_message_id, o.c.sent_at).where(o.c.state == "sent")).all())
    assert sent_before > 0
    # Four channels, LINE included; its signed follow webhooks landed exactly once (one consent each).
    followed = re.search(r"([\d,]+) demo members added the shop's LINE account as a friend", out)
    assert followed, out[-3000:]
    from membercare.engagement.models import EngagementEventRow

    e = EngagementEventRow.__table__
    with engine.connect() as conn:
        by_channel = dict(conn.execute(sa.select(o.c.channel, sa.func.count()).where(o.c.state == "sent")
                                       .group_by(o.c.channel)).all())
        follows = conn.execute(sa.select(sa.func.count()).where(e.c.channel == "line", e.c.kind == "resubscribed")
                               ).scalar_one()
        line_dupes = conn.execute(sa.select(e.c.provider_event_id).where(e.c.provider == "line")
                                  .group_by(e.c.provider_event_id).having(sa.func.count() > 1)).all()
    # (Which other channels send depends on the hour: quiet hours defer SMS and push at night.)
    assert by_channel.get("line", 0) > 0 and by_channel.get("email", 0) > 0, by_channel
    assert follows == int(followed.group(1).replace(",", "")) and not line_dupes
    # Simulated purchases: a share of the clicked messages became orders, and each was attributed to its message.
    # (How many depends on the clicks of this run: ~5 at 500 members, so possibly none.)
    said = re.search(r"simulated purchases: ([\d,]+) orders from ([\d,]+) clicked", out)
    assert said, out[-3000:]
    sim_orders, attributed = _simulated_orders(engine)
    assert sim_orders == int(said.group(1).replace(",", "")) and attributed == sim_orders, (said.group(0), attributed)

    # Journeys ran on a simulated clock, and their section is in the report.
    assert "Journeys on a simulated clock" in out and "Journey instances now" in out
    assert re.search(r"journeys on a simulated clock: \d+ advance-journeys runs, [\d,]+ messages sent", out)
    assert "Journeys: funnel and lift" in (home / "report.html").read_text(encoding="utf-8")
    journey_sent = _journey_messages_once(engine)
    assert journey_sent > 0

    second = run_demo(env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "using the existing demo shop (500 members)" in second.stdout
    assert "nothing sent twice" in second.stdout
    with engine.connect() as conn:
        # New rows only for members who entered a segment since the first run (the simulated purchases can
        # move a member into one): never a second row for a member an occurrence had already planned.
        rows_after = set(conn.execute(sa.select(o.c.campaign, o.c.occurrence, o.c.member_id, o.c.id)).all())
        assert {r[3] for r in rows_before} <= {r[3] for r in rows_after}
        planned_before = {r[:3] for r in rows_before}
        assert not [r for r in rows_after if r not in rows_before and r[:3] in planned_before]
        assert conn.execute(sa.select(sa.func.count()).where(o.c.state == "sent")).scalar_one() >= sent_before
        # (A row may legitimately carry attempts > 1: a throttled or 5xx answer retried before acceptance.)
        sends_after = set(conn.execute(
            sa.select(o.c.id, o.c.provider_message_id, o.c.sent_at).where(o.c.state == "sent")).all())
        assert sends_before <= sends_after, "the second run resent messages the first run had sent"
    assert _simulated_orders(engine) == (sim_orders, attributed), "the rerun must not import the orders again"
    assert _journey_messages_once(engine) >= journey_sent
    engine.dispose()


def _simulated_orders(engine) -> tuple[int, int]:
    from membercare.engagement.attribution_models import Attribution
    from membercare.models import Order

    od, a = Order.__table__, Attribution.__table__
    with engine.connect() as conn:
        ids = [r for r in conn.execute(sa.select(od.c.id).where(od.c.external_id.like("SIM-%"))).scalars()]
        attributed = conn.execute(sa.select(sa.func.count(sa.distinct(a.c.order_id)))
                                  .where(a.c.order_id.in_(ids), a.c.message_id.is_not(None))).scalar_one() if ids else 0
    return len(ids), attributed


def _journey_messages_once(engine) -> int:
    """Each journey message exactly once: one outbox row per instance and send step (the row its step log
    names), and never one provider message id for two rows. Returns how many were sent."""
    from membercare.delivery.models import OutboxMessage
    from membercare.journeys.models import JourneyStep

    o, js = OutboxMessage.__table__, JourneyStep.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(o.c.idempotency_key, o.c.occurrence, o.c.state, o.c.provider_message_id)
                            .where(o.c.occurrence.like("journey:%"))).all()
        logged = conn.execute(sa.select(js.c.message_key).where(js.c.kind == "send", js.c.message_key.is_not(None))
                              ).scalars().all()
    pairs = [(r.occurrence, r.idempotency_key.rsplit("|@", 1)[1]) for r in rows]
    assert len(pairs) == len(set(pairs)), "an instance's step was planned twice"
    assert sorted(logged) == sorted(r.idempotency_key for r in rows)
    sent = [r.provider_message_id for r in rows if r.state == "sent"]
    ids = [i for i in sent if i is not None]  # (a LINE push or an FCM send may come back without one)
    assert len(ids) == len(set(ids)), "a provider accepted one journey message twice"
    return len(sent)
