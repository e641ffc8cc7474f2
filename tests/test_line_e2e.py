"""LINE end to end: plan -> the LINE adapter on line-bot-sdk -> the sandbox's Messaging API -> simulated LINE
users -> signed webhooks -> the real receiver (uvicorn on loopback) -> engagement ledger and consent.

* every webhook the simulated users post lands exactly once, a redelivered body changes nothing;
* a forged or tampered ``X-Line-Signature`` is refused with nothing stored;
* an unfollow (block) and a "取消" message stop the next LINE message to that member (the next campaign
  falls back to email); a follow grants LINE consent, and the next campaign reaches that member on LINE.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from channels.line.adapter import LineChannel, LineConfig
from channels.line.sandbox import webhook_body, webhook_event
from channels.line.webhooks import line_signature
from fakes import seed_members, simple_renderer
from membercare.consent import current_consents
from membercare.delivery.contract import LineContent
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage, Suppression
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.engagement.models import EngagementEventRow
from membercare.models import Channel, Member, Purpose
from membercare.receiver import ReceiverConfig, create_app
from sandbox_fixtures import *  # noqa: F403 - the sandbox fixtures

OB, E, M, S = OutboxMessage.__table__, EngagementEventRow.__table__, Member.__table__, Suppression.__table__
LINE_TOKEN = "line-e2e-channel-access-token"
LINE_SECRET = "fedcba9876543210fedcba9876543210"
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
FAST = DispatchConfig(workers=4, batch_size=20, backoff_base=0.05, backoff_max=0.5, flush_interval=0.05,
                      error_min_samples=10_000)
BOTH = (Channel.LINE, Channel.EMAIL)


def user_id(member_id: int) -> str:
    return "U" + f"{member_id:032x}"


def render(request):
    """Email from ``simple_renderer``; LINE text plus a Flex bubble whose postback carries our message id."""
    if request.channel != Channel.LINE:
        return simple_renderer(request)
    flex = {"type": "bubble", "body": {"type": "box", "layout": "vertical", "contents": [
        {"type": "button", "action": {"type": "postback", "label": "看看",
                                      "data": f"mid={request.message_id}&action=open"}}]}}
    return LineContent(text=f"{request.campaign}：{request.member['name']} 您好", flex_json=json.dumps(flex),
                       alt_text=request.campaign)


class Receiver:
    """``create_app`` with the LINE channel secret, served by uvicorn in a thread."""

    def __init__(self, engine):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = ReceiverConfig(public_url=self.url, secret_key="line-e2e-link-secret-0123456789",
                                webhook_secrets=(("line", LINE_SECRET),), shop_name="LINE Shop")
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


def settle(sandbox, engine, timeout: float = 30.0) -> int:
    deadline, last, stable = time.monotonic() + timeout, -1, 0
    while time.monotonic() < deadline:
        sandbox.drain(timeout=5)
        with engine.connect() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(E)).scalar_one()
        stable = stable + 1 if n == last and sandbox.stats()["pending_webhooks"] == 0 else 0
        if stable >= 3:
            return n
        last = n
        time.sleep(0.2)
    raise AssertionError("LINE webhooks did not settle")


@pytest.mark.slow
def test_line_messages_webhooks_once_forgeries_refused_and_unfollow_stops_the_next_message(sandbox, engine):
    seeded = datetime.now(UTC)
    with engine.begin() as c:
        members = seed_members(c, 4, preferred="line,email", push=False, now=seeded,
                               consent=(("line", "marketing"), ("email", "marketing")))
        newcomer = seed_members(c, 1, preferred="line,email", push=False, now=seeded,
                                consent=(("email", "marketing"),))[0]
        for m in [*members, newcomer]:
            c.execute(sa.update(M).where(M.c.id == m).values(line_user_id=user_id(m)))
    blocker, stopper = members[0], members[1]

    with Receiver(engine) as receiver:
        sandbox.configure(line_access_tokens=[LINE_TOKEN], webhook_url=receiver.url, line_channel_secret=LINE_SECRET,
                          engagement={"line": {"delivered": 1.0, "opened": 1.0, "clicked": 1.0, "unsubscribed": 0.0}})
        from channels.registry import build_channels, close_channels

        adapters = {**build_channels({"MEMBERCARE_SENDGRID_API_KEY": "SG.sandbox-test-key",
                                      "MEMBERCARE_SENDGRID_FROM": "shop@example.com",
                                      "MEMBERCARE_SENDGRID_BASE_URL": sandbox.url}),
                    Channel.LINE: LineChannel(LineConfig(channel_access_token=LINE_TOKEN, base_url=sandbox.url))}
        try:
            as_of = datetime.now(UTC) - timedelta(hours=1)
            run1 = plan_run(engine, PlanSpec("line_hello", as_of.date().isoformat(), Purpose.MARKETING, BOTH),
                            [[*members, newcomer]], as_of, render, policy=NOPOLICY).run_id
            report = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run1)
            assert report.outcomes["sent"] == 5
            with engine.connect() as c:
                first = {r.member_id: r for r in c.execute(sa.select(OB).where(OB.c.run_id == run1))}
            assert {m: first[m].channel for m in members} == {m: "line" for m in members}
            assert first[newcomer].channel == "email"  # no LINE consent yet

            # Each LINE message was tapped: one postback per message, carrying its message id.
            settle(sandbox, engine)
            # Then a block, an opt-out keyword, an ordinary message and a new friend, through the sandbox.
            for kind, who, text in (("unfollow", blocker, None), ("message", stopper, "取消"),
                                    ("message", members[2], "謝謝"), ("follow", newcomer, None)):
                r = httpx.post(f"{sandbox.url}/sandbox/line/events", json={"type": kind, "userId": user_id(who),
                                                                           **({"text": text} if text else {})})
                assert r.status_code == 202
            stored = settle(sandbox, engine)
            stats = sandbox.stats()
            assert stats["webhooks"].get("line.gave_up", 0) == 0
            line_events = sum(n for k, n in stats["events"].items() if k.startswith("line.") and k.count(".") == 1)
            assert stored == line_events == 4 + 4
            with engine.connect() as c:
                rows = c.execute(sa.select(E.c.kind, E.c.message_id, E.c.member_id).where(E.c.channel == "line")).all()
                dupes = c.execute(sa.select(E.c.provider_event_id).group_by(E.c.provider_event_id)
                                  .having(sa.func.count() > 1)).all()
            assert not dupes and all(r.member_id is not None for r in rows)
            clicks = {r.message_id for r in rows if r.kind == "clicked"}
            assert clicks == {first[m].message_id for m in members}
            assert sorted(r.kind for r in rows if r.kind != "clicked") == [
                "inbound", "inbound", "resubscribed", "unsubscribed"]

            # Forged, tampered and redelivered webhooks: nothing more is stored.
            event = webhook_event("unfollow", user_id(members[3]), event_id="01JFORGED0000000000000000A",
                                  at=time.time())
            body = webhook_body("U" + "0" * 32, [event])
            for signature in (line_signature("0" * 32, body), line_signature(LINE_SECRET, body + b" ")):
                r = httpx.post(f"{receiver.url}/webhooks/line", content=body,
                               headers={"X-Line-Signature": signature, "Content-Type": "application/json"})
                assert r.status_code == 403
            r = httpx.post(f"{receiver.url}/webhooks/line", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 401
            redelivered = webhook_body("U" + "0" * 32, [webhook_event("follow", user_id(newcomer), at=time.time(),
                                                                      event_id="01JREDELIVERED000000000000")])
            headers = {"X-Line-Signature": line_signature(LINE_SECRET, redelivered)}
            line_url = f"{receiver.url}/webhooks/line"
            assert httpx.post(line_url, content=redelivered, headers=headers).json()["stored"] == 1
            assert httpx.post(f"{receiver.url}/webhooks/line", content=redelivered,
                              headers=headers).json()["duplicates"] == 1
            with engine.connect() as c:
                assert c.execute(sa.select(sa.func.count()).select_from(E)).scalar_one() == stored + 1
                assert current_consents(c, members[3])[("line", "marketing")] is True  # the forgery changed nothing
                assert current_consents(c, blocker)[("line", "marketing")] is False
                assert current_consents(c, stopper)[("line", "marketing")] is False
                assert current_consents(c, members[2])[("line", "marketing")] is True
                assert current_consents(c, newcomer)[("line", "marketing")] is True
                blocked = c.execute(sa.select(S.c.reason).where(S.c.channel == "line")).scalars().all()
            assert blocked == ["unsubscribe"]  # the block: the user id is unreachable on LINE

            # The next campaign: the blocker and the stopper fall back to email, the newcomer gets LINE.
            sent_before = {rec["seq"] for rec in sandbox.messages("line")}
            run2 = plan_run(engine, PlanSpec("line_again", as_of.date().isoformat(), Purpose.MARKETING, BOTH),
                            [[*members, newcomer]], datetime.now(UTC), render, policy=NOPOLICY).run_id
            Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run2)
            with engine.connect() as c:
                second = {r.member_id: r for r in c.execute(sa.select(OB).where(OB.c.run_id == run2))}
            assert {m: second[m].channel for m in [*members, newcomer]} == {
                blocker: "email", stopper: "email", members[2]: "line", members[3]: "line", newcomer: "line"}
            assert all(r.state == "sent" for r in second.values())
            new_line = [rec for rec in sandbox.messages("line") if rec["seq"] not in sent_before]
            assert sorted(rec["message_id"] for rec in new_line) == sorted(
                second[m].message_id for m in (members[2], members[3], newcomer))
            settle(sandbox, engine)
        finally:
            close_channels(adapters)


@pytest.mark.parametrize("secret", ["", "too-short", "g" * 32])
def test_the_receiver_refuses_a_malformed_line_channel_secret_at_start_up(secret):
    from membercare.errors import ConfigurationError

    if not secret:
        assert "/webhooks/line (MEMBERCARE_LINE_CHANNEL_SECRET)" in ReceiverConfig.from_env({}).disabled_endpoints()
        return
    with pytest.raises(ConfigurationError, match="MEMBERCARE_LINE_CHANNEL_SECRET"):
        ReceiverConfig.from_env({"MEMBERCARE_LINE_CHANNEL_SECRET": secret})
