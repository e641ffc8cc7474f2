"""The webhook receiver end to end (FastAPI TestClient), on SQLite and PostgreSQL.

Signed sample payloads shaped like the providers' documented ones are accepted and stored once;
tampered, forged, garbled and replayed ones are rejected and leave no row.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

from channels.fcm.webhooks import sign_push_tracking
from channels.sendgrid.webhooks import SendGridWebhookSigner
from channels.twilio.webhooks import twilio_signature
from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.engagement.models import EngagementEventRow
from membercare.errors import ConfigurationError
from membercare.links import LinkSigner, sign_member_token
from membercare.models import ConsentEvent, Device, Member
from membercare.receiver import ReceiverConfig, create_app

PUBLIC = "https://hooks.shop.example/mc"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
PUSH_SECRET = "push-secret-for-tests"
SECRET = "link-secret-for-tests-0123456789"
SIGNER = SendGridWebhookSigner.from_seed("tests")
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
def world(engine):
    with Session(engine, expire_on_commit=False) as s:
        ann = Member(external_id="M1", name="Ann", email="ann@example.com", phone="+886912345678", locale="en",
                     joined_at=T0 - timedelta(days=10))
        bo = Member(external_id="M2", name="陳博", email="bo@example.com", phone="+886987654321", locale="zh-TW",
                    joined_at=T0 - timedelta(days=10))
        s.add_all([ann, bo])
        s.flush()
        s.add(Device(member_id=ann.id, token="tok-ann-0123456789", platform="ios", app_id="shop", last_seen_at=T0))
        s.commit()
    with engine.begin() as conn:
        record_consents(conn, [ConsentStatement(m, ch, p, True, "signup_form", T0 - timedelta(days=5))
                               for m in (ann.id, bo.id) for ch in ("email", "sms", "push")
                               for p in ("marketing", "transactional")])
    config = ReceiverConfig(public_url=PUBLIC, secret_key=SECRET, sendgrid_public_key=SIGNER.public_key_b64,
                            twilio_auth_token=TWILIO_TOKEN, push_tracking_secret=PUSH_SECRET, shop_name="Good Days",
                            support_contact="02-2700-1234")
    client = TestClient(create_app(config, engine))
    return {"client": client, "engine": engine, "ann": ann.id, "bo": bo.id, "config": config}


def rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(EngagementEventRow.__table__)).scalar()


def sg_body(n: int = 3, prefix: str = "e") -> bytes:
    ts = int(time.time()) - 30
    kinds = ["processed", "delivered", "open", "click"]
    return json.dumps([
        {"email": "ann@example.com", "timestamp": ts, "event": kinds[i % 4], "sg_event_id": f"{prefix}{i}",
         "sg_message_id": "Xg7_ZjmHSpiC3aiHvhuP2w.filterdrecv-1", "membercare_message_id": f"m{i}",
         "url": "https://shop.example.com/" if kinds[i % 4] == "click" else None}
        for i in range(n)
    ], separators=(",", ":")).encode()


def post_sg(client, body: bytes, headers: dict):
    return client.post("/webhooks/sendgrid", content=body, headers={"Content-Type": "application/json", **headers})


# -- SendGrid --------------------------------------------------------------------------------------------------------


def test_sendgrid_signed_batch_is_stored_once(world):
    c, engine = world["client"], world["engine"]
    body = sg_body(4)
    r = post_sg(c, body, SIGNER.sign(body))
    assert r.status_code == 200, r.text
    assert r.json() == {"received": 4, "stored": 4, "duplicates": 0}
    assert rows(engine) == 4  # committed before the answer: visible to another connection
    # SendGrid retries a batch it thinks failed: same bytes, fresh signature.
    r = post_sg(c, body, SIGNER.sign(body))
    assert r.status_code == 200 and r.json()["duplicates"] == 4
    assert rows(engine) == 4


def _forgeries(body: bytes):
    good = SIGNER.sign(body)
    sig_h, ts_h = list(good)
    other = SendGridWebhookSigner.generate().sign(body)
    stale_ts = int(time.time()) - 3600
    future_ts = int(time.time()) + 3600
    yield "tampered body", body.replace(b"open", b"spamreport"), good, 403
    yield "wrong key", body, other, 403
    yield "garbled signature", body, {sig_h: "!!not base64!!", ts_h: good[ts_h]}, 403
    yield "valid base64, not a signature", body, {sig_h: base64.b64encode(b"x" * 70).decode(), ts_h: good[ts_h]}, 403
    yield "signature for another timestamp", body, {sig_h: good[sig_h], ts_h: str(int(good[ts_h]) + 1)}, 403
    yield "replayed (stale)", body, SIGNER.sign(body, timestamp=stale_ts), 403
    yield "from the future", body, SIGNER.sign(body, timestamp=future_ts), 403
    yield "non-numeric timestamp", body, {sig_h: good[sig_h], ts_h: "yesterday"}, 403
    yield "missing signature", body, {ts_h: good[ts_h]}, 401
    yield "missing timestamp", body, {sig_h: good[sig_h]}, 401
    yield "unsigned", body, {}, 401


def test_sendgrid_forged_tampered_and_replayed_requests_leave_no_trace(world):
    c, engine = world["client"], world["engine"]
    body = sg_body(3)
    for name, sent, headers, status in _forgeries(body):
        r = post_sg(c, sent, headers)
        assert r.status_code == status, name
    assert rows(engine) == 0


def test_sendgrid_malformed_but_signed_body_is_400(world):
    c = world["client"]
    for body in (b"{not json", b'{"event": "open"}'):
        assert post_sg(c, body, SIGNER.sign(body)).status_code == 400
    assert rows(world["engine"]) == 0


def test_unconfigured_endpoint_refuses_everything(engine):
    client = TestClient(create_app(ReceiverConfig(public_url=PUBLIC), engine))
    body = sg_body(1)
    assert post_sg(client, body, SIGNER.sign(body)).status_code == 503
    assert client.post("/track/push", content=b"{}").status_code == 503
    assert rows(engine) == 0


def test_bad_sendgrid_key_fails_at_startup():
    with pytest.raises(ConfigurationError):
        ReceiverConfig(sendgrid_public_key="bm90IGEga2V5")


# -- Twilio ----------------------------------------------------------------------------------------------------------


def post_twilio(client, path: str, params: dict, *, token=TWILIO_TOKEN, query: str = "", sign_url: str | None = None,
                sent_params: dict | None = None):
    url = f"{PUBLIC}{path}" + (f"?{query}" if query else "")
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "X-Twilio-Signature": twilio_signature(token, sign_url or url, params)}
    target = path + (f"?{query}" if query else "")
    return client.post(target, content=urlencode(sent_params or params), headers=headers)


STATUS = {"MessageSid": "SM0123456789abcdef0123456789abcdef", "SmsSid": "SM0123456789abcdef0123456789abcdef",
          "AccountSid": "AC" + "1" * 32, "From": "+15005550006", "To": "+886912345678", "ApiVersion": "2010-04-01",
          "MessageStatus": "delivered", "SmsStatus": "delivered", "ErrorCode": ""}


def test_twilio_status_callback_signed_over_public_url(world):
    c, engine = world["client"], world["engine"]
    r = post_twilio(c, "/webhooks/twilio/status", STATUS, query="mid=m_1&ik=k%7C1")
    assert r.status_code == 204, r.text
    r = post_twilio(c, "/webhooks/twilio/status", STATUS, query="mid=m_1&ik=k%7C1")  # Twilio retry
    assert r.status_code == 204
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        got = conn.execute(sa.select(t.c.kind, t.c.message_id, t.c.provider_event_id)).all()
    assert got == [("delivered", "m_1", f"status:{STATUS['MessageSid']}:delivered")]


def test_twilio_forgeries_are_rejected(world):
    c, engine = world["client"], world["engine"]
    path = "/webhooks/twilio/status"
    assert post_twilio(c, path, STATUS, token="wrong-token").status_code == 403
    # Signed for the internal address instead of the public URL the provider called.
    assert post_twilio(c, path, STATUS, sign_url=f"http://127.0.0.1:8080{path}").status_code == 403
    assert post_twilio(c, path, STATUS, sent_params={**STATUS, "MessageStatus": "failed"}).status_code == 403
    assert post_twilio(c, path, STATUS, query="mid=m_1", sign_url=f"{PUBLIC}{path}?mid=m_2").status_code == 403
    r = c.post(path, content=urlencode(STATUS), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 401
    assert rows(engine) == 0
    # Signed, but not a status callback.
    assert post_twilio(c, path, {"Foo": "bar"}).status_code == 400
    assert rows(engine) == 0


def inbound(body: str, sid: str, sender: str) -> dict:
    return {"MessageSid": sid, "SmsSid": sid, "AccountSid": "AC" + "1" * 32, "From": sender, "To": "+15005550006",
            "Body": body, "NumMedia": "0", "NumSegments": "1"}


def test_stop_and_start_by_sms(world):
    c, engine, ann = world["client"], world["engine"], world["ann"]
    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("STOP", "SM1", "+886912345678"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    # Twilio confirms STOP itself: we answer with an empty TwiML response.
    assert "<Message>" not in r.text
    ev = ConsentEvent.__table__
    with engine.connect() as conn:
        assert current_consents(conn, ann)[("sms", "marketing")] is False
        assert current_consents(conn, ann)[("sms", "transactional")] is True
        last = conn.execute(sa.select(ev.c.source).where(ev.c.member_id == ann, ev.c.channel == "sms")
                            .order_by(ev.c.id.desc())).scalar()
    assert last == "sms_stop"
    post_twilio(c, "/webhooks/twilio/inbound", inbound("START", "SM2", "+886912345678"))
    with engine.connect() as conn:
        assert current_consents(conn, ann)[("sms", "marketing")] is True


def test_chinese_keywords_and_help_reply_in_the_members_language(world):
    c, engine, bo = world["client"], world["engine"], world["bo"]
    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("退訂", "SM3", "+886987654321"))
    assert "已取消優惠簡訊" in r.text  # Twilio does not know 退訂: we confirm, in zh-TW
    with engine.connect() as conn:
        assert current_consents(conn, bo)[("sms", "marketing")] is False
    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("HELP", "SM4", "+886912345678"))
    assert "Reply STOP" in r.text and "Good Days" in r.text and "02-2700-1234" in r.text
    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("help", "SM5", "+886987654321"))
    assert "回覆STOP" in r.text
    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("Thanks!", "SM6", "+886987654321"))
    assert "<Message>" not in r.text
    assert rows(engine) == 4


# -- Push tracking ---------------------------------------------------------------------------------------------------


def post_push(client, payload, *, secret=PUSH_SECRET, body: bytes | None = None):
    raw = json.dumps(payload).encode() if body is None else body
    return client.post("/track/push", content=raw,
                       headers={"Content-Type": "application/json",
                                "X-Membercare-Signature": sign_push_tracking(secret, raw)})


def test_push_tracking(world):
    c, engine = world["client"], world["engine"]
    now = datetime.now(UTC)
    report = {"event_id": "r1", "message_id": "m_9", "event": "opened", "occurred_at": now.isoformat(),
              "platform": "ios"}
    assert post_push(c, report).status_code == 200
    assert post_push(c, report).json()["duplicates"] == 1
    dead = {"event_id": "r2", "token": "tok-ann-0123456789", "event": "unregistered", "occurred_at": now.isoformat()}
    assert post_push(c, [dead]).status_code == 200
    d = Device.__table__
    with engine.connect() as conn:
        assert conn.execute(sa.select(d.c.invalid_reason)).scalar() == "unregistered"
    assert rows(engine) == 2


def test_push_forgeries_and_stale_reports(world):
    c, engine = world["client"], world["engine"]
    now = datetime.now(UTC)
    report = {"event_id": "r1", "message_id": "m_9", "event": "opened", "occurred_at": now.isoformat()}
    assert post_push(c, report, secret="not-the-secret").status_code == 403
    raw = json.dumps(report).encode()
    tampered = raw.replace(b"opened", b"dismissed")
    r = c.post("/track/push", content=tampered,
               headers={"X-Membercare-Signature": sign_push_tracking(PUSH_SECRET, raw)})
    assert r.status_code == 403
    assert c.post("/track/push", content=raw).status_code == 401
    old = {**report, "occurred_at": (now - timedelta(days=30)).isoformat()}
    assert post_push(c, old).status_code == 403
    assert post_push(c, None, body=b"{oops").status_code == 400
    assert rows(engine) == 0


# -- Member links ----------------------------------------------------------------------------------------------------


def test_preference_page_in_the_members_language(world):
    c = world["client"]
    r = c.get(f"/u/{sign_member_token(world['bo'], SECRET, 'email')}")
    assert r.status_code == 200 and "訂閱偏好設定" in r.text and "取消所有電子郵件優惠訊息" in r.text
    assert "bo@example.com" not in r.text  # masked
    assert r.headers["cache-control"] == "no-store"
    r = c.get(f"/u/{sign_member_token(world['ann'], SECRET)}/preferences")
    assert r.status_code == 200 and "Message preferences" in r.text and 'name="consent.sms.marketing"' in r.text
    # Viewing the page changes nothing (link scanners fetch it).
    with world["engine"].connect() as conn:
        assert current_consents(conn, world["ann"])[("email", "marketing")] is True


def test_forged_and_preview_tokens_are_refused(world):
    c = world["client"]
    good = sign_member_token(world["ann"], SECRET, "email")
    forged = sign_member_token(world["ann"], "another-secret", "email")
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    preview = LinkSigner.preview().token(world["ann"], "email")
    for token in (forged, flipped, preview, "short"):
        assert c.get(f"/u/{token}").status_code == 403
        r = c.post(f"/u/{token}", content="List-Unsubscribe=One-Click",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 403
    with world["engine"].connect() as conn:
        assert current_consents(conn, world["ann"])[("email", "marketing")] is True
    assert c.get(f"/u/{sign_member_token(999_999, SECRET)}").status_code == 404


def test_one_click_unsubscribe_rfc8058(world):
    c, engine, ann = world["client"], world["engine"], world["ann"]
    token = sign_member_token(ann, SECRET, "email")
    for _ in range(2):  # mail clients may retry: still one history row
        r = c.post(f"/u/{token}", content="List-Unsubscribe=One-Click",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
    ev = ConsentEvent.__table__
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        consents = current_consents(conn, ann)
        history = conn.execute(sa.select(ev.c.source).where(ev.c.member_id == ann, ev.c.granted.is_(False))).all()
        logged = conn.execute(sa.select(t.c.kind, t.c.channel, t.c.member_id)).all()
    assert consents[("email", "marketing")] is False
    assert consents[("sms", "marketing")] is True and consents[("email", "transactional")] is True
    assert history == [("list_unsubscribe",)]
    assert logged == [("unsubscribed", "email", ann)]


def test_preference_form(world):
    c, engine, bo = world["client"], world["engine"], world["bo"]
    token = sign_member_token(bo, SECRET)
    form = {"action": "save", "consent.email.marketing": "on", "consent.push.transactional": "on"}
    r = c.post(f"/u/{token}", data=form)
    assert r.status_code == 200 and "已儲存" in r.text
    with engine.connect() as conn:
        consents = current_consents(conn, bo)
    assert consents[("email", "marketing")] is True
    assert consents[("sms", "marketing")] is False and consents[("push", "marketing")] is False
    assert consents[("sms", "transactional")] is False and consents[("push", "transactional")] is True
    assert consents[("email", "transactional")] is True  # locked: receipts are always sent
    r = c.post(f"/u/{token}", data={"action": "unsubscribe"})
    with engine.connect() as conn:
        assert current_consents(conn, bo)[("email", "marketing")] is False
    assert c.post(f"/u/{token}", data={"action": "dance"}).status_code == 400


def test_healthz(world):
    assert world["client"].get("/healthz").json() == {"status": "ok"}
