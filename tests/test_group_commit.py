"""Group commit in the receiver: concurrent Twilio status callbacks share transactions, every request is
answered only after its event is committed, and one failing request does not fail the others."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import httpx
import pytest
import sqlalchemy as sa

from channels.twilio.events import parse_status_callback
from channels.twilio.webhooks import twilio_signature
from membercare.engagement.models import EngagementEventRow
from membercare.receiver import ReceiverConfig, create_app
from membercare.receiver import group_commit as gc

PUBLIC = "https://hooks.shop.example/mc"
TOKEN = "twilio-auth-token-for-tests"


def status(i: int, state: str = "delivered") -> dict[str, str]:
    return {"MessageSid": f"SM{i:032x}", "AccountSid": "AC" + "1" * 32, "From": "+15005550006",
            "To": "+886912345678", "MessageStatus": state, "SmsStatus": state, "ErrorCode": ""}


def stored(engine) -> list[tuple[str, str]]:
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(t.c.message_id, t.c.kind)).all())


async def post_all(app, params: list[tuple[dict, str]]) -> list[int]:
    """Every callback posted at once (signed as Twilio signs them); the status codes, in order."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 is an answer here
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
        async def post(p: dict, query: str) -> int:
            url = f"{PUBLIC}/webhooks/twilio/status?{query}"
            r = await client.post(f"/webhooks/twilio/status?{query}", content=urlencode(p), headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": twilio_signature(TOKEN, url, p)})
            return r.status_code
        return await asyncio.gather(*(post(p, q) for p, q in params))


@pytest.fixture
def app(engine):
    return create_app(ReceiverConfig(public_url=PUBLIC, secret_key="s" * 32, twilio_auth_token=TOKEN), engine)


def test_concurrent_callbacks_share_transactions_and_are_all_stored(app, engine):
    params = [(status(i), f"mid=m{i:03d}&ik=k%7C{i}") for i in range(60)]
    params.append(params[5])  # a Twilio retry arriving with the original: stored once
    codes = asyncio.run(post_all(app, params))
    assert codes == [204] * 61
    assert stored(engine) == [(f"m{i:03d}", "delivered") for i in range(60)]
    grouped = app.state.group_commit
    assert grouped.requests == 61
    assert grouped.transactions < 61, "concurrent requests should have shared transactions"


def test_a_failing_request_fails_alone(app, engine, monkeypatch):
    real = gc.ingest_events

    def ingest(engine_, events):
        if any(e.message_id == "m-bad" for e in events):
            raise RuntimeError("poison")
        return real(engine_, events)

    monkeypatch.setattr(gc, "ingest_events", ingest)
    params = [(status(i), f"mid=m{i:03d}&ik=k%7C{i}") for i in range(20)]
    params.insert(7, (status(999), "mid=m-bad&ik=k%7C999"))

    transport_codes = asyncio.run(post_all(app, params))
    assert transport_codes[7] == 500
    assert [c for i, c in enumerate(transport_codes) if i != 7] == [204] * 20
    assert stored(engine) == [(f"m{i:03d}", "delivered") for i in range(20)]


def test_an_idle_receiver_commits_the_first_request_at_once_and_bounds_transactions(engine):
    async def run():
        grouped = gc.GroupCommit(engine, max_events=4)
        events = [parse_status_callback(status(i), {"mid": f"m{i:03d}"}) for i in range(10)]
        first = await grouped.store(events[:1])  # nothing else queued: its own transaction, at once
        assert first.stored == 1 and grouped.transactions == 1
        results = await asyncio.gather(*(grouped.store([e]) for e in events[1:]))
        assert all(r.received <= 4 for r in results)  # max_events bounds each transaction
        return grouped

    grouped = asyncio.run(run())
    assert grouped.transactions >= 1 + 9 // 4
    assert len(stored(engine)) == 10
    with pytest.raises(ValueError):
        gc.GroupCommit(engine, max_events=0)
