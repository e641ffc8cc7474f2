"""The dispatcher on its async transport (the default): worker threads pass the send gate, one event loop
per process carries the HTTP exchanges (aiohttp, the SDKs building each request), against the sandbox.

Outcomes must be exactly those of the blocking transport: a connection dropped after the request was
written is ``unknown`` (never ``failed``, never resent for marketing), 429s are deferred and sent later,
a refused key stops the run loudly with nothing attempted. At most ``workers`` calls are in flight."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from channels.sendgrid.adapter import SendGridConfig, SendGridEmailChannel
from fakes import seed_members, simple_renderer
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose
from sandbox_fixtures import *  # noqa: F403

OB, R = OutboxMessage.__table__, CampaignRun.__table__
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
QUIET = {"engagement": {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")},
         "webhook_max_attempts": 1}
FAST = DispatchConfig(workers=8, batch_size=40, backoff_base=0.05, backoff_max=0.2, wait_for_deferred=10.0,
                      flush_interval=0.05, ambiguous_retry_delay=0.2, error_min_samples=10_000)


def plan(engine, n, channel, purpose=Purpose.MARKETING):
    now = datetime.now(UTC)
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred=channel, consent=[(channel, purpose.value)], now=now)
    spec = PlanSpec(f"async-{channel}", "2026-11-23", purpose, (Channel(channel),))
    return plan_run(engine, spec, [ids], now, simple_renderer, policy=NOPOLICY).run_id


def states(engine, run_id):
    with engine.connect() as conn:
        return Counter(r.state for r in conn.execute(sa.select(OB.c.state).where(OB.c.run_id == run_id)))


def test_default_transport_is_async():
    assert DispatchConfig().transport == "async"
    with pytest.raises(Exception, match="transport"):
        DispatchConfig(transport="fibres")


@pytest.mark.parametrize("transport", ["async", "threads"])
@pytest.mark.parametrize("channel", ["email", "sms", "push"])
def test_connections_dropped_after_sending_are_unknown_not_failed(sqlite_engine, sandbox, adapters, channel,
                                                                  transport):
    sandbox.configure(**QUIET, **{channel: {"drop_rate": 1.0}})
    run_id = plan(sqlite_engine, 12, channel)
    rep = Dispatcher(sqlite_engine, adapters, config=replace(FAST, transport=transport),
                     policy=NOPOLICY).dispatch(run_id)
    assert rep.outcomes["unknown"] == 12 and rep.attempts == 12, rep.outcomes
    assert states(sqlite_engine, run_id) == {"unknown": 12}
    with sqlite_engine.connect() as conn:
        reasons = {r.reason_code for r in conn.execute(sa.select(OB.c.reason_code).where(OB.c.run_id == run_id))}
    assert reasons == {"ambiguous_failure"}
    assert sandbox.stats()["faults"][channel] == {"drop": 12}  # each tried once: marketing is never resent


@pytest.mark.parametrize("channel", ["email", "sms", "push"])
def test_5xx_and_429_are_retried_and_every_message_is_sent_once(sqlite_engine, sandbox, adapters, channel):
    # 20 % errors: a message fails only after max_transient_failures (8) errors in a row, 2.6e-6 per message (at
    # 30 % it was 6.6e-5, and the three channels' 120 messages failed a CI run about once in a hundred).
    sandbox.configure(**QUIET, **{channel: {"error_rate": 0.2, "rate_limit": 50.0, "burst": 2}})
    run_id = plan(sqlite_engine, 40, channel)
    rep = Dispatcher(sqlite_engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
    stats = sandbox.stats()
    with sqlite_engine.connect() as conn:
        unsent = conn.execute(sa.select(OB.c.state, OB.c.attempts, OB.c.transient_failures, OB.c.reason,
                                        OB.c.last_error).where(OB.c.run_id == run_id, OB.c.state != "sent")).all()
    assert states(sqlite_engine, run_id) == {"sent": 40}, (rep.outcomes, rep.next_due_at, stats["faults"], unsent)
    assert stats["accepted"] == {channel: 40} and stats["duplicates_by_message_id_total"] == 0
    assert stats["faults"][channel]["error"] > 0 and stats["throttled"].get(channel, 0) > 0
    assert rep.outcomes["throttled"] > 0 and rep.outcomes["retry"] > 0, rep.outcomes


def test_a_refused_key_stops_the_run_and_leaves_the_rest_planned(sqlite_engine, sandbox, adapters, channel_env):
    sandbox.configure(**QUIET)
    run_id = plan(sqlite_engine, 30, "email")
    bad = SendGridEmailChannel(replace(SendGridConfig.from_env(channel_env), api_key="SG.wrong"))
    try:
        with pytest.raises(ConfigurationError, match="MEMBERCARE_SENDGRID_API_KEY"):
            Dispatcher(sqlite_engine, {**adapters, Channel.EMAIL: bad}, config=FAST, policy=NOPOLICY).dispatch(run_id)
    finally:
        bad.close()
    assert states(sqlite_engine, run_id) == {"planned": 30}
    with sqlite_engine.connect() as conn:
        assert conn.execute(sa.select(R.c.status).where(R.c.id == run_id)).scalar_one() == "paused"
    assert sandbox.stats()["accepted"] == {}


class CountingAsync:
    """The real SMS adapter, counting its exchanges in flight on the send loop."""

    def __init__(self, inner):
        self.inner, self.channel = inner, inner.channel
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def send(self, message):
        return self.inner.send(message)

    async def send_async(self, message):
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            return await self.inner.send_async(message)
        finally:
            with self._lock:
                self.now -= 1

    def close(self):
        pass


def test_in_flight_calls_are_bounded_by_workers(sqlite_engine, sandbox, adapters):
    sandbox.configure(**QUIET, sms={"latency_ms": 40})
    run_id = plan(sqlite_engine, 60, "sms")
    sms = CountingAsync(adapters[Channel.SMS])
    rep = Dispatcher(sqlite_engine, {**adapters, Channel.SMS: sms}, config=replace(FAST, workers=5),
                     policy=NOPOLICY).dispatch(run_id)
    assert rep.outcomes["sent"] == 60
    assert 2 <= sms.peak <= 5
