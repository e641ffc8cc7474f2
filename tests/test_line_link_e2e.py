"""LINE's account-link flow end to end: the provider sandbox (LINE's Messaging API, its webhooks and its
account-link dialog) and the real receiver (uvicorn on loopback), through line-bot-sdk.

follow (unlinked) -> the receiver issues a link token and replies with the shop's login link -> the shop
authenticates the member and asks ``POST /line/link`` for the redirect -> the browser opens LINE's dialog
-> the signed ``accountLink`` webhook spends the nonce -> the member has the LINE user id -> a campaign's
LINE message reaches them. A replayed dialog (same link token and nonce) and a forged nonce change nothing.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from channels.fcm.webhooks import sign_push_tracking
from channels.line.adapter import LineChannel, LineConfig
from channels.line.sandbox import webhook_body, webhook_event
from channels.line.webhooks import line_signature
from fakes import seed_members
from membercare.consent import current_consents
from membercare.delivery.contract import LineContent
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.models import Channel, Member, Purpose
from membercare.receiver import ReceiverConfig, create_app
from sandbox_fixtures import *  # noqa: F403 - the sandbox fixtures

M, OB = Member.__table__, OutboxMessage.__table__
LINE_TOKEN = "line-link-e2e-channel-access-token"
LINE_SECRET = "abcdef0123456789abcdef0123456789"
TRIGGER_SECRET = "line-link-e2e-trigger-secret"
LOGIN = "https://shop.example/login"
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
FAST = DispatchConfig(workers=2, batch_size=10, backoff_base=0.05, backoff_max=0.5, flush_interval=0.05,
                      error_min_samples=10_000)


class Receiver:
    """``create_app(config)`` served by uvicorn in a thread."""

    def __init__(self, engine, **config):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = ReceiverConfig(public_url=self.url, secret_key="line-link-e2e-secret-0123456789", **config)
        self.server = uvicorn.Server(uvicorn.Config(create_app(cfg, engine), host="127.0.0.1", port=self.port,
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


def render(request) -> LineContent:
    return LineContent(text=f"{request.campaign}：{request.member['name']} 您好")


def replies(sandbox) -> list[dict]:
    sandbox.drain(timeout=10)
    return httpx.get(f"{sandbox.url}/sandbox/line/replies").json()


def line_user_id(engine, member_id: int) -> str | None:
    with engine.connect() as c:
        return c.execute(sa.select(M.c.line_user_id).where(M.c.id == member_id)).scalar()


@pytest.mark.slow
def test_follow_link_token_login_account_link_then_line_reaches_the_member(sandbox, engine):
    seeded = datetime.now(UTC)
    with engine.begin() as c:
        member, bystander = seed_members(c, 2, preferred="line,email", push=False, now=seeded,
                                         consent=(("email", "marketing"),))
        external = c.execute(sa.select(M.c.external_id).where(M.c.id == member)).scalar()
    user = "U" + "4c1" * 10 + "ab"

    with Receiver(engine, webhook_secrets=(("line", LINE_SECRET),), trigger_secret=TRIGGER_SECRET,
                  line_access_token=LINE_TOKEN, line_base_url=sandbox.url, line_login_url=LOGIN,
                  line_account_link_url=f"{sandbox.url}/dialog/bot/accountLink") as receiver:
        sandbox.configure(line_access_tokens=[LINE_TOKEN], webhook_url=receiver.url, line_channel_secret=LINE_SECRET,
                          engagement={"line": {"delivered": 1.0, "opened": 0.0, "clicked": 0.0,
                                               "unsubscribed": 0.0}})
        # 1. An unlinked user follows the account: the answer to the webhook replies with the login link.
        assert httpx.post(f"{sandbox.url}/sandbox/line/events",
                          json={"type": "follow", "userId": user}).status_code == 202
        (prompt,) = replies(sandbox)
        text = prompt["messages"][0]["text"]
        assert "綁定 LINE 帳號" in text
        login = re.search(r"https://shop\.example/login\?\S+", text).group(0)
        link_token = parse_qs(urlsplit(login).query)["linkToken"][0]

        # 2. The shop authenticated the member on its login page; its backend asks for the redirect.
        body = json.dumps({"member": external, "linkToken": link_token}).encode()
        r = httpx.post(f"{receiver.url}/line/link", content=body,
                       headers={"X-Membercare-Signature": sign_push_tracking(TRIGGER_SECRET, body)})
        assert r.status_code == 200
        redirect = r.json()["redirect"]
        assert redirect.startswith(f"{sandbox.url}/dialog/bot/accountLink?")
        nonce = parse_qs(urlsplit(redirect).query)["nonce"][0]

        # A forged nonce for this user, signed with the channel secret as LINE would: refused, nothing linked.
        forged = webhook_body("U" + "0" * 32, [webhook_event(
            "accountLink", user, event_id="01JFORGEDLINK0000000000000", at=time.time(),
            link={"result": "ok", "nonce": nonce[:-4] + "AAAA"})])
        r = httpx.post(f"{receiver.url}/webhooks/line", content=forged,
                       headers={"X-Line-Signature": line_signature(LINE_SECRET, forged)})
        assert r.json()["account_link"] == {"unknown": 1}
        assert line_user_id(engine, member) is None

        # 3. The member's browser opens LINE's dialog: LINE posts accountLink with our nonce.
        r = httpx.get(redirect)
        assert r.status_code == 200 and r.json() == {"result": "ok", "webhook_delivered": True}
        assert line_user_id(engine, member) == user and line_user_id(engine, bystander) is None
        with engine.connect() as c:
            assert current_consents(c, member)[("line", "marketing")] is True
        # A replay of the dialog (same link token and nonce): LINE says failed, the nonce is spent: nothing moves.
        r = httpx.get(redirect)
        assert r.json() == {"result": "failed", "webhook_delivered": True}
        assert line_user_id(engine, member) == user

        # Linked followers asking again ("綁定") get a fresh link; a follow of a linked user does not.
        for kind, extra in (("message", {"text": "綁定"}), ("follow", {})):
            httpx.post(f"{sandbox.url}/sandbox/line/events", json={"type": kind, "userId": user, **extra})
        assert len(replies(sandbox)) == 2

        # 4. The next campaign reaches the member on LINE.
        adapters = {Channel.LINE: LineChannel(LineConfig(channel_access_token=LINE_TOKEN, base_url=sandbox.url))}
        try:
            as_of = datetime.now(UTC) - timedelta(minutes=5)
            run = plan_run(engine, PlanSpec("line_linked", as_of.date().isoformat(), Purpose.MARKETING,
                                            (Channel.LINE,)),
                           [[member, bystander]], as_of, render, policy=NOPOLICY).run_id
            Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run)
        finally:
            for adapter in adapters.values():
                adapter.close()
        with engine.connect() as c:
            rows = {r.member_id: r for r in c.execute(sa.select(OB).where(OB.c.run_id == run))}
        assert rows[member].channel == "line" and rows[member].state == "sent"
        (pushed,) = [m for m in sandbox.messages("line") if m["message_id"] == rows[member].message_id
                     or m["provider_id"] == rows[member].provider_message_id]
        (record,) = [r for r in sandbox.app.state.records if r.seq == pushed["seq"]]
        assert record.to == user
        assert bystander not in rows or rows[bystander].channel != "line"
        sandbox.drain(timeout=10)
