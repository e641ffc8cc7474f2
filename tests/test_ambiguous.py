"""The ambiguous window: failures after which the provider may have accepted the message.

Adapters classify transport failures (``TransientFailure.ambiguous``); the dispatcher never blindly
resends an ambiguous marketing message (``unknown``, settled by reconciliation) and checks provider
records before resending a transactional one. Also: the SendGrid adapter's two transports send the
same request and map answers the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import requests
import sqlalchemy as sa
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from channels.base import transport_failure
from channels.sendgrid.adapter import SendGridConfig, SendGridEmailChannel
from fakes import FakeAdapter, seed_members, simple_renderer
from membercare.delivery.contract import EmailContent, OutboundMessage, TransientFailure
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.delivery.reconcile import StaticRecords, reconcile_unknown
from membercare.models import Channel, Purpose
from sandbox_fixtures import *  # noqa: F403  # noqa: F403

OB = OutboxMessage.__table__
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
FAST = DispatchConfig(workers=4, batch_size=20, backoff_base=0.005, backoff_max=0.02, wait_for_deferred=5.0,
                      flush_interval=0.02, ambiguous_retry_delay=0.05, error_min_samples=1000)


def plan(engine, n, purpose):
    # Seeded and planned at one reading of the real clock, the one the dispatchers here run on.
    now = datetime.now(UTC)
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred="email", consent=[("email", purpose.value)], now=now)
    spec = PlanSpec("amb", "2026-11-23", purpose, (Channel.EMAIL,))
    return plan_run(engine, spec, [ids], now, simple_renderer, policy=NOPOLICY).run_id


def rows(engine, run_id):
    with engine.connect() as conn:
        return {r.message_id: r for r in conn.execute(sa.select(OB).where(OB.c.run_id == run_id))}


def ghost_first_attempt(every: int):
    """Every ``every``-th message: "accepted" (recorded as sent to the provider) but answered ambiguously."""
    ghosted: dict[str, str] = {}

    def script(message, call):
        idx = int(message.idempotency_key.rsplit("|", 1)[1])
        if idx % every == 0 and message.message_id not in ghosted:
            ghosted[message.message_id] = f"prov-{message.message_id}"
            return TransientFailure("connection lost after sending: RemoteDisconnected", ambiguous=True)
        return None

    return script, ghosted


def test_ambiguous_marketing_failure_is_unknown_never_resent_and_reconciled(engine):
    run_id = plan(engine, 40, Purpose.MARKETING)
    script, ghosted = ghost_first_attempt(4)
    email = FakeAdapter("email", script)
    rep = Dispatcher(engine, {"email": email, "sms": FakeAdapter("sms"), "push": FakeAdapter("push")},
                     config=FAST, policy=NOPOLICY).dispatch(run_id)
    assert len(ghosted) == 10 and rep.outcomes["unknown"] == 10 and rep.outcomes["sent"] == 30
    assert email.calls == 40  # nothing was resent
    ledger = rows(engine, run_id)
    for mid in ghosted:
        assert ledger[mid].state == "unknown" and ledger[mid].reason_code == "ambiguous_failure"
        assert "marketing: not resent" in ledger[mid].reason and ledger[mid].attempts == 1
    rep2 = reconcile_unknown(engine, run_id=run_id, records=StaticRecords(ghosted), grace=timedelta(0))
    assert rep2.found_sent == 10
    ledger = rows(engine, run_id)
    assert all(r.state == "sent" for r in ledger.values())
    assert {ledger[m].provider_message_id for m in ghosted} == set(ghosted.values())


def test_ambiguous_transactional_failure_checks_records_before_resending(engine):
    run_id = plan(engine, 40, Purpose.TRANSACTIONAL)
    script, ghosted = ghost_first_attempt(4)
    email = FakeAdapter("email", script)


    class HalfKnown:
        """The provider has a record of about half of the ambiguous sends (odd message ids); the rest never
        arrived. Which messages ghost is decided while dispatching, so the lookup reads ``ghosted`` live."""

        def lookup(self, ids):
            return {m: ghosted[m] for m in ids if m in ghosted and int(m, 16) % 2}

    rep = Dispatcher(engine, {"email": email}, config=FAST, policy=NOPOLICY, records=HalfKnown()).dispatch(run_id)
    found = {m for m in ghosted if int(m, 16) % 2}
    assert rep.outcomes["ambiguous_retry"] == 10 and rep.outcomes["reconciled"] == len(found)
    assert email.calls == 40 + (10 - len(found))  # only messages without a provider record were resent
    ledger = rows(engine, run_id)
    assert Counter(r.state for r in ledger.values()) == {"sent": 40}
    assert all(ledger[m].reason_code == "reconciled" for m in found)
    assert all(ledger[m].reason_code == "sent" and ledger[m].attempts == 2 for m in set(ghosted) - found)


def test_ambiguous_transactional_failures_that_never_stop_end_unknown_not_failed(sqlite_engine):
    run_id = plan(sqlite_engine, 3, Purpose.TRANSACTIONAL)
    always = FakeAdapter("email", lambda m, n: TransientFailure("read timeout after sending", ambiguous=True))
    cfg = replace(FAST, max_transient_failures=3)
    rep = Dispatcher(sqlite_engine, {"email": always}, config=cfg, policy=NOPOLICY).dispatch(run_id)
    assert rep.outcomes["unknown"] == 3 and always.calls == 9
    assert all(r.state == "unknown" and "gave up resending after 3" in r.reason
               for r in rows(sqlite_engine, run_id).values())


# ---------------------------------------------------------------------------------------------------------------------
# Classification of transport failures (requests: Twilio, FCM, SendGrid's pooled transport).


@pytest.mark.parametrize("exc, ambiguous", [
    (requests.ConnectTimeout("connect timed out"), False),
    (requests.ConnectionError(MaxRetryError(None, "/", NewConnectionError(None, "refused"))), False),
    (requests.ReadTimeout("read timed out"), True),
    (requests.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))), True),
    (requests.exceptions.ChunkedEncodingError("torn"), True),
])
def test_transport_failures_are_ambiguous_only_after_the_request_was_sent(exc, ambiguous):
    result = transport_failure(exc)
    assert isinstance(result, TransientFailure) and result.ambiguous is ambiguous and not result.throttled


@pytest.mark.parametrize("status, ambiguous", [(500, False), (503, False), (502, True), (504, True)])
def test_sendgrid_gateway_errors_are_ambiguous_server_errors_are_not(status, ambiguous):
    adapter = SendGridEmailChannel(SendGridConfig("SG.x", "shop@example.com", base_url="http://127.0.0.1:9"))
    msg = OutboundMessage("m", "k", Channel.EMAIL, Purpose.MARKETING, "a@example.com", EmailContent("s", "h", "t"))
    result = adapter._from_status(status, {}, b'{"errors": [{"message": "x"}]}', msg)
    assert isinstance(result, TransientFailure) and result.ambiguous is ambiguous
    adapter.close()


# ---------------------------------------------------------------------------------------------------------------------
# SendGrid: the pooled transport sends what the SDK builds and maps answers like the SDK transport.


def test_sendgrid_transports_send_the_same_request_and_map_answers_alike(sandbox, channel_env):
    sandbox.configure(capture_requests=10)
    config = SendGridConfig.from_env(channel_env)
    assert config.transport == "pooled"
    pooled, sdk = SendGridEmailChannel(config), SendGridEmailChannel(replace(config, transport="sdk"))
    content = EmailContent("Hello", "<p>Hi</p>", "Hi", headers={"List-Unsubscribe": "<https://x.test/u>"})
    msg = OutboundMessage("m1", "c|o|1", Channel.EMAIL, Purpose.MARKETING, "ann@example.com", content,
                          categories=("promo",))
    try:
        a, b = pooled.send(msg), sdk.send(replace(msg, message_id="m2"))
        assert a.status == b.status == 202 and a.provider_message_id and b.provider_message_id
        first, second = sandbox.captured()[-2:]
        assert json.loads(first["body"]) == {**json.loads(second["body"]), "personalizations": [
            {**json.loads(second["body"])["personalizations"][0],
             "custom_args": {**json.loads(second["body"])["personalizations"][0]["custom_args"],
                             "membercare_message_id": "m1"}}]}
        for name in ("User-Agent", "Accept", "Content-Type"):
            assert first["headers"][name] == second["headers"][name]
        bad = replace(msg, to="not..valid@example.com")
        assert pooled.send(bad) == sdk.send(bad)
        sandbox.configure(email={"rate_limit": 1.0, "burst": 1})
        pooled.send(msg)  # takes the only token
        x, y = pooled.send(msg), sdk.send(msg)
        assert x.throttled and y.throttled and x.retry_after and y.retry_after
        assert type(x) is type(y) and x.status == y.status == 429 and not x.ambiguous
    finally:
        pooled.close()
        sdk.close()
