"""The engagement loop end to end: plan -> real adapters -> provider sandbox -> simulated recipients ->
signed webhooks -> the real receiver (uvicorn on loopback) -> engagement ledger -> attribution -> report.

* every event the sandbox's simulated recipients post lands exactly once;
* an SMS STOP reply and an RFC 8058 one-click unsubscribe (the URL taken from the rendered email's
  ``List-Unsubscribe`` header) revoke consent, and the next campaign does not reach that member on that
  channel (it falls back to the next consented channel);
* ``membercare report`` shows the figures.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from fakes import seed_members, simple_renderer
from membercare.consent import current_consents
from membercare.delivery.contract import EmailContent
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.engagement.models import EngagementEventRow
from membercare.links import LinkSigner
from membercare.models import Channel, Order, Purpose
from membercare.receiver import ReceiverConfig, create_app
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import TWILIO_TOKEN, env_for

OB, E = OutboxMessage.__table__, EngagementEventRow.__table__
SECRET = "e2e-link-secret-0123456789abcdef"
PUSH_SECRET = "e2e-push-tracking-secret"
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
ALL = (Channel.EMAIL, Channel.SMS, Channel.PUSH)
FAST = DispatchConfig(workers=8, batch_size=50, backoff_base=0.05, backoff_max=0.5, flush_interval=0.05,
                      error_min_samples=10_000)
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """``create_app`` served by uvicorn in a thread (access log off, as ``membercare serve`` runs it)."""

    def __init__(self, engine, sendgrid_key: str):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = ReceiverConfig(public_url=self.url, secret_key=SECRET, sendgrid_public_key=sendgrid_key,
                                twilio_auth_token=TWILIO_TOKEN, push_tracking_secret=PUSH_SECRET, shop_name="E2E Shop")
        self.server = uvicorn.Server(uvicorn.Config(create_app(config, engine), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="receiver", daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def renderer_with_unsubscribe(public_url: str):
    """``simple_renderer`` plus the RFC 8058 headers the real renderer puts on marketing mail."""
    signer = LinkSigner(secret=SECRET, public_url=public_url)

    def render(request):
        content = simple_renderer(request)
        if isinstance(content, EmailContent):
            member_id = int(request.member["id"])
            content = replace(content, headers={"List-Unsubscribe": f"<{signer.unsubscribe_url(member_id, 'email')}>",
                                                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
        return content

    return render


def wait_for_quiet(sandbox, engine, timeout: float = 30.0) -> int:
    """Wait until the sandbox has no webhook pending and the ledger stopped growing; returns the row count."""
    deadline, last, stable = time.monotonic() + timeout, -1, 0
    while time.monotonic() < deadline:
        sandbox.drain(timeout=5)
        with engine.connect() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(E)).scalar_one()
        stable = stable + 1 if n == last and sandbox.stats()["pending_webhooks"] == 0 else 0
        if stable >= 3:
            return n
        last = n
        time.sleep(0.3)
    raise AssertionError("engagement did not settle")


def posted_events(stats) -> int:
    """Events the simulated recipients sent: SendGrid events, Twilio callbacks and replies, app reports."""
    return sum(n for kind, n in stats["events"].items())


@pytest.mark.slow
def test_engagement_lands_once_opt_outs_stick_and_the_report_shows_it(sandbox, service_account, engine, db_url,
                                                                    tmp_path):
    sqlite = engine.dialect.name == "sqlite"
    seeded_at = datetime.now(UTC)  # the real clock: the sandbox and the receiver stamp events with it
    with engine.begin() as c:
        email_first = seed_members(c, 3, preferred="email,sms,push", now=seeded_at)
        sms_first = seed_members(c, 2, preferred="sms,email,push", now=seeded_at)
        push_first = seed_members(c, 1, preferred="push,email,sms", now=seeded_at)
    members = email_first + sms_first + push_first
    stopper, one_clicker = sms_first[0], email_first[0]

    with Receiver(engine, sandbox.sendgrid_public_key) as receiver:
        env = {**env_for(sandbox, service_account), "MEMBERCARE_PUBLIC_URL": receiver.url}
        from channels.registry import build_channels, close_channels

        adapters = build_channels(env)
        try:
            render = renderer_with_unsubscribe(receiver.url)
            as_of = datetime.now(UTC) - timedelta(hours=1)
            spec = PlanSpec("autumn_sale", as_of.date().isoformat(), Purpose.MARKETING, ALL)
            run1 = plan_run(engine, spec, [members], as_of, render, policy=NOPOLICY).run_id
            with engine.connect() as c:
                plan = {r.member_id: r for r in c.execute(sa.select(OB).where(OB.c.run_id == run1))}
            assert {m: plan[m].channel for m in members} == {
                **{m: "email" for m in email_first}, **{m: "sms" for m in sms_first}, **{m: "push" for m in push_first}}
            # Everyone engages; the stopper replies STOP to their SMS.
            sandbox.configure(
                # SQLite: callbacks wait until dispatch is done. The dispatcher's run-completion transaction
                # reads before it writes and fails with "database is locked" when the receiver commits in
                # between (reported to the delivery owners); PostgreSQL runs everything concurrently.
                engagement_delay_ms=1500.0 if sqlite else 0.0,
                webhook_url=receiver.url, push_tracking_secret=PUSH_SECRET,
                engagement={"email": {"delivered": 1.0, "opened": 1.0, "clicked": 1.0, "unsubscribed": 0.0,
                                      "complained": 0.0},
                            "sms": {"delivered": 1.0, "unsubscribed": 0.0},
                            "push": {"delivered": 1.0, "opened": 1.0, "unsubscribed": 0.0}},
                engagement_rules=[{"match": {"channel": "sms", "mid": plan[stopper].message_id},
                                   "rates": {"unsubscribed": 1.0}}],
            )
            report = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run1)
            assert report.outcomes["sent"] == len(members)
            stored = wait_for_quiet(sandbox, engine)

            stats = sandbox.stats()
            assert stats["webhooks"].get("sendgrid.gave_up", 0) == 0 and stats["pending_webhooks"] == 0
            # Exactly once per event: every simulated event is one row, and nothing else is.
            assert stored == posted_events(stats), stats["events"]
            with engine.connect() as c:
                kinds = Counter((ch, k) for ch, k in c.execute(sa.select(E.c.channel, E.c.kind)))
                dupes = c.execute(sa.select(E.c.provider, E.c.provider_event_id).group_by(
                    E.c.provider, E.c.provider_event_id).having(sa.func.count() > 1)).all()
                unresolved = c.execute(sa.select(sa.func.count()).select_from(E).where(E.c.member_id.is_(None))
                                       ).scalar_one()
            assert not dupes and unresolved == 0
            assert kinds[("email", "opened")] == 3 and kinds[("email", "clicked")] == 3
            assert kinds[("email", "delivered")] == 3 and kinds[("sms", "delivered")] == 2
            assert kinds[("push", "push_opened")] == 1 and kinds[("sms", "inbound")] == 1

            # One-click unsubscribe with the URL from the rendered email's List-Unsubscribe header.
            with engine.connect() as c:
                from membercare.delivery.models import decode_contents

                blob = c.execute(sa.select(OB.c.content).where(OB.c.message_id == plan[one_clicker].message_id)
                                 ).scalar_one()
            header = decode_contents(blob)["email"].headers["List-Unsubscribe"]
            url = header.strip("<>")
            assert url.startswith(receiver.url + "/u/")
            r = httpx.post(url, content="List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
            assert r.status_code == 200
            with engine.connect() as c:
                assert current_consents(c, stopper)[("sms", "marketing")] is False
                assert current_consents(c, stopper)[("email", "marketing")] is True
                assert current_consents(c, one_clicker)[("email", "marketing")] is False
                assert current_consents(c, one_clicker)[("sms", "marketing")] is True

            # Orders after the engagement: credited to the messages by the report's attribution.
            now = datetime.now(UTC)
            with engine.begin() as c:
                c.execute(sa.insert(Order.__table__), [
                    dict(external_id="E2E-1", member_id=email_first[1], placed_at=now,
                         status="paid", total_minor=120_000, currency="TWD", updated_at=now),
                    dict(external_id="E2E-2", member_id=sms_first[1], placed_at=now,
                         status="paid", total_minor=30_000, currency="TWD", updated_at=now),
                    dict(external_id="E2E-3", member_id=email_first[2], placed_at=now,
                         status="refunded", total_minor=99_000, currency="TWD", updated_at=now),
                ])

            # The next campaign's recipients engage after the orders. SendGrid stamps its events in whole
            # seconds, so without this an event in the orders' own second would look older than them.
            after_orders = math.floor(now.timestamp()) + 1
            sandbox.set_event_clock(lambda ctx, event: max(time.time(), after_orders))
            # The next campaign: neither opt-out is reached on the channel they left.
            spec2 = PlanSpec("winter_sale", as_of.date().isoformat(), Purpose.MARKETING, ALL)
            run2 = plan_run(engine, spec2, [members], datetime.now(UTC), render, policy=NOPOLICY).run_id
            Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run2)
            wait_for_quiet(sandbox, engine)
            with engine.connect() as c:
                second = {r.member_id: r for r in c.execute(sa.select(OB).where(OB.c.run_id == run2))}
            assert second[stopper].channel == "email" and second[stopper].state == "sent"
            assert second[one_clicker].channel == "sms" and second[one_clicker].state == "sent"
            # What the providers actually received for the second campaign: one message per member, the
            # stopper's by email (no SMS), the one-clicker's by SMS (no email).
            received = {rec["message_id"]: rec["channel"] for rec in sandbox.messages()}
            run2_channels = {m: received.get(r.message_id) for m, r in second.items()}
            assert run2_channels[stopper] == "email" and run2_channels[one_clicker] == "sms"
            assert all(run2_channels.values())
        finally:
            close_channels(adapters)

    # `membercare report` shows the figures (a separate process, reading the same database).
    envp = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    envp.update(MEMBERCARE_HOME=str(tmp_path / "home"), MEMBERCARE_DATABASE_URL=db_url, COLUMNS="200")
    res = subprocess.run([sys.executable, "-c",
                          "import sys, membercare.cli as c, membercare.cli.report; c.main(sys.argv[1:])",
                          "report", "--campaign", "autumn_sale", "--since",
                          (as_of - timedelta(days=1)).isoformat(), "--json"],
                         capture_output=True, text=True, env=envp, cwd=ROOT, timeout=180)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rows = {r["channel"]: r for r in data["funnel"]}
    assert (rows["email"]["sent"], rows["email"]["delivered"], rows["email"]["opened"],
            rows["email"]["clicked"]) == (3, 3, 3, 3)
    assert (rows["sms"]["sent"], rows["sms"]["delivered"], rows["push"]["opened"]) == (2, 2, 1)
    # Conversions: the email buyer (opened) and the SMS buyer (delivered); the refund earns nothing.
    assert (rows["email"]["converted"], rows["email"]["revenue_minor"]) == (1, 120_000)
    assert (rows["sms"]["converted"], rows["sms"]["revenue_minor"]) == (1, 30_000)
    # Opt-outs: the STOP reply on SMS, the one-click unsubscribe on email (neither carried a message id).
    assert rows["sms"]["unsubscribed"] == 1 and rows["email"]["unsubscribed"] == 1
    assert rows["sms"]["sms_segments"] == 2
    text = subprocess.run([sys.executable, "-c",
                           "import sys, membercare.cli as c, membercare.cli.report; c.main(sys.argv[1:])",
                           "report", "--since", (as_of - timedelta(days=1)).isoformat(), "--no-refresh"],
                          capture_output=True, text=True, env=envp, cwd=ROOT, timeout=180)
    assert text.returncode == 0, text.stderr
    assert "autumn_sale" in text.stdout and "winter_sale" in text.stdout and "1,500 TWD" in text.stdout


def test_provider_events_settle_unknown_outbox_rows(engine):
    """A provider event with our message id proves acceptance: an ``unknown`` row becomes ``sent``; a
    rejection, our own pages' events and already-sent rows change nothing."""
    from membercare.engagement.events import EngagementEvent
    from membercare.engagement.store import ingest_events

    as_of = datetime.now(UTC) - timedelta(minutes=5)
    with engine.begin() as c:
        (member,) = seed_members(c, 1, push=False, now=as_of)
    spec = PlanSpec("reconcile_me", "1", Purpose.MARKETING, (Channel.EMAIL,))
    run = plan_run(engine, spec, [[member]], as_of, simple_renderer, policy=NOPOLICY).run_id
    with engine.begin() as c:
        mid = c.execute(sa.select(OB.c.message_id).where(OB.c.run_id == run)).scalar_one()
        c.execute(sa.update(OB).where(OB.c.message_id == mid).values(state="unknown", attempts=1,
                                                                    reason_code="in_flight_at_crash"))

    def event(kind, key, provider="sendgrid", at=None):
        return EngagementEvent(provider=provider, dedupe_key=key, kind=kind, channel="email",
                               occurred_at=at or datetime.now(UTC), message_id=mid, provider_message_id="sg-77")

    def row():
        with engine.connect() as c:
            return c.execute(sa.select(OB.c.state, OB.c.reason_code, OB.c.provider_message_id, OB.c.sent_at)
                             .where(OB.c.message_id == mid)).one()

    assert ingest_events(engine, [event("rejected", "sg:r1")]).settled == 0
    assert ingest_events(engine, [event("unsubscribed", "mc:1", provider="membercare")]).settled == 0
    assert row().state == "unknown"
    delivered_at = datetime.now(UTC) - timedelta(minutes=1)
    res = ingest_events(engine, [event("opened", "sg:o1"), event("delivered", "sg:d1", at=delivered_at)])
    assert res.settled == 1
    state, reason, provider_id, sent_at = row()
    assert (state, reason, provider_id) == ("sent", "reconciled", "sg-77")
    assert abs((sent_at - delivered_at).total_seconds()) < 0.01  # the earliest proof bounds the send time
    assert ingest_events(engine, [event("clicked", "sg:c1")]).settled == 0  # already sent: no update
