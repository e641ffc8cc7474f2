"""Hostile input at the webhook receiver, on SQLite and PostgreSQL: every bad request gets a clear error, and
nothing valid beside it is lost.

* NUL and other control characters in ids and addresses (SendGrid ``email`` / ``membercare_message_id`` /
  ``sg_message_id`` / ``sg_event_id``, Twilio ``From`` / ``To`` / ``MessageSid`` / ``?mid=``, push
  ``message_id`` / ``token`` / ``event_id``, trigger fields): the batch is answered 2xx, the valid events in it
  are stored and take effect, and the bad one is stored without the unusable key (SendGrid, Twilio) or
  refused on its own with the reason (app push reports, triggers).
* Deeply nested JSON: 400 before anything is parsed or stored (SendGrid, push tracking, triggers).
* Bodies over an endpoint's limit: 413 without reading past the limit (``Content-Length`` up front,
  chunked uploads counted as they stream); bodies that are not UTF-8: 400.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from channels.fcm.webhooks import MAX_BODY as PUSH_MAX_BODY
from channels.fcm.webhooks import SIGNATURE_HEADER as APP_SIGNATURE
from channels.fcm.webhooks import sign_push_tracking
from channels.sendgrid.webhooks import SendGridWebhookSigner
from channels.twilio.webhooks import MAX_BODY as TWILIO_MAX_BODY
from channels.twilio.webhooks import twilio_signature
from membercare.config import Settings
from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.delivery.models import CampaignRun, OutboxMessage, Suppression
from membercare.engagement.events import MAX_JSON_DEPTH, MalformedPayload, json_too_deep, loads_json
from membercare.engagement.models import EngagementEventRow
from membercare.links import sign_member_token
from membercare.models import Device, Member
from membercare.receiver import ReceiverConfig, create_app
from membercare.receiver.app import PAGE_MAX_BODY
from membercare.receiver.triggers import MAX_BODY as TRIGGER_MAX_BODY
from membercare.receiver.triggers import TriggerConfig, build_trigger_router

PUBLIC = "https://hooks.shop.example/mc"
TWILIO_TOKEN = "twilio-auth-token-for-hostile-tests"
PUSH_SECRET = "push-secret-for-hostile-tests"
TRIGGER_SECRET = "trigger-secret-for-hostile-tests"
SECRET = "link-secret-for-hostile-tests-0123"
SIGNER = SendGridWebhookSigner.from_seed("hostile-tests")
SENDGRID_MAX_BODY = 256 * 1024  # small, so that the over-limit cases stay cheap
NOW = datetime.now(UTC).replace(microsecond=0)
E, OB, S = EngagementEventRow.__table__, OutboxMessage.__table__, Suppression.__table__


@pytest.fixture
def world(engine):
    """Ann and Bo, consented everywhere, each with a sent marketing email (message ids m_ann / m_bo)."""
    with Session(engine, expire_on_commit=False) as s:
        ann = Member(external_id="M1", name="Ann", email="ann@example.com", phone="+886912345678", locale="en",
                     joined_at=NOW - timedelta(days=100))
        bo = Member(external_id="M2", name="陳博", email="bo@example.com", phone="+886987654321", locale="zh-TW",
                    joined_at=NOW - timedelta(days=100))
        s.add_all([ann, bo])
        s.flush()
        run = CampaignRun(campaign="news", occurrence="w1", purpose="marketing", as_of=NOW - timedelta(hours=2))
        s.add(run)
        s.flush()
        for member, mid in ((ann, "m_ann"), (bo, "m_bo")):
            s.add(OutboxMessage(message_id=mid, run_id=run.id, campaign="news", occurrence="w1", member_id=member.id,
                                idempotency_key=f"news|w1|{member.id}", purpose="marketing", channel="email",
                                state="sent", reason_code="sent", reason="sent", scheduled_at=NOW - timedelta(hours=2)))
        s.add(Device(member_id=ann.id, token="tok-ann-0123456789", platform="ios", app_id="shop",
                     last_seen_at=NOW - timedelta(days=1)))
        s.commit()
    with engine.begin() as conn:
        record_consents(conn, [ConsentStatement(m, ch, "marketing", True, "signup_form", NOW - timedelta(days=5))
                               for m in (ann.id, bo.id) for ch in ("email", "sms", "push")])
    config = ReceiverConfig(public_url=PUBLIC, secret_key=SECRET, sendgrid_public_key=SIGNER.public_key_b64,
                            twilio_auth_token=TWILIO_TOKEN, push_tracking_secret=PUSH_SECRET,
                            trigger_secret=TRIGGER_SECRET, max_body_bytes=SENDGRID_MAX_BODY, shop_name="Good Days")
    app = create_app(config, engine)
    return {"client": TestClient(app), "app": app, "engine": engine, "ann": ann.id, "bo": bo.id}


def consent(engine, member: int, channel: str) -> bool | None:
    with engine.connect() as conn:
        return current_consents(conn, member).get((channel, "marketing"))


def events(engine, *columns):
    with engine.connect() as conn:
        return conn.execute(sa.select(*columns).order_by(E.c.id)).all()


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


# -- SendGrid ---------------------------------------------------------------------------------------------------------


def sg(event: str, sg_event_id: str, *, email="ann@example.com", mid: str | None = "m_ann", **extra) -> dict:
    d = {"email": email, "timestamp": int(NOW.timestamp()) - 60, "event": event, "sg_event_id": sg_event_id,
         "sg_message_id": "Xg7_ZjmHSpiC3aiHvhuP2w.filterdrecv-1", **extra}
    if mid is not None:
        d["membercare_message_id"] = mid
    return d


def post_sg(client, batch) -> object:
    body = batch if isinstance(batch, bytes) else json.dumps(batch).encode()
    return client.post("/webhooks/sendgrid", content=body,
                       headers={"Content-Type": "application/json", **SIGNER.sign(body)})


# NUL in every key; the other control characters (C0, DEL, C1) in the address and our id.
HOSTILE_KEYS = [(field, "\x00") for field in ("email", "membercare_message_id", "sg_message_id", "sg_event_id")] + [
    ("email", "\x01"), ("email", "\n"), ("email", "\x7f"), ("membercare_message_id", "\x85")]


@pytest.mark.parametrize("field, bad", HOSTILE_KEYS, ids=[f"{f}-{ord(b):02x}" for f, b in HOSTILE_KEYS])
def test_sendgrid_control_character_in_a_key_keeps_the_valid_unsubscribe_beside_it(world, field, bad):
    c, engine, ann, bo = world["client"], world["engine"], world["ann"], world["bo"]
    hostile = sg("open", "ev-open", mid="m_ann")
    hostile[field] = hostile[field][:3] + bad + hostile[field][3:]
    batch = [hostile, sg("unsubscribe", "ev-unsub", email="bo@example.com", mid="m_bo")]

    r = post_sg(c, batch)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["received"], answer["stored"], answer["duplicates"]) == (2, 2, 0)
    if field == "sg_event_id":
        assert "cleaned" not in answer  # the parser hashes the id whole: nothing needed cleaning
    else:
        assert answer["cleaned"] == [{"index": 0, "fields": [field]}]
    # The valid unsubscribe took effect in the same request.
    assert consent(engine, bo, "email") is False
    assert consent(engine, ann, "email") is True

    rows = events(engine, E.c.kind, E.c.message_id, E.c.provider_message_id, E.c.member_id, E.c.provider_event_id,
                  E.c.raw)
    opened = rows[0] if rows[0].kind == "opened" else rows[1]
    # The unusable key is stored as NULL, never "cleaned" into another id; the member is still found through
    # the other key (the message id, or the address).
    assert opened.member_id == ann
    assert opened.message_id == (None if field == "membercare_message_id" else "m_ann")
    assert opened.provider_message_id == (None if field == "sg_message_id" else "Xg7_ZjmHSpiC3aiHvhuP2w")
    assert bad not in opened.provider_event_id and "\x00" not in opened.provider_event_id
    # The raw payload keeps what SendGrid sent, NUL included (as the JSON escape \u0000).
    assert json.loads(opened.raw)[field] == hostile[field]

    # SendGrid retries a batch it thinks failed: the hashed key still recognises the event.
    again = post_sg(c, batch)
    assert again.status_code == 200 and again.json()["duplicates"] == 2
    assert count(engine, E) == 2


def test_sendgrid_unsubscribe_with_a_nul_address_falls_back_to_the_message_id(world):
    c, engine, ann = world["client"], world["engine"], world["ann"]
    r = post_sg(c, [sg("unsubscribe", "u1", email="ann@exa\x00mple.com", mid="m_ann")])
    assert r.status_code == 200 and r.json()["cleaned"] == [{"index": 0, "fields": ["email"]}]
    assert consent(engine, ann, "email") is False


def test_sendgrid_hard_bounce_of_an_unusable_address_suppresses_nothing(world):
    """An address with a NUL is nobody's: stripping the NUL could suppress (or unsubscribe) another member."""
    c, engine, ann = world["client"], world["engine"], world["ann"]
    batch = [sg("bounce", "b1", email="ann@example.com\x00", mid=None, type="bounce", reason="550 no such user"),
             sg("unsubscribe", "u2", email="a\x00nn@example.com", mid=None),
             sg("spamreport", "c1", email="bo@example.com", mid=None)]
    r = post_sg(c, batch)
    assert r.status_code == 200, r.text
    assert r.json()["cleaned"] == [{"index": 0, "fields": ["email"]}, {"index": 1, "fields": ["email"]}]
    with engine.connect() as conn:
        assert conn.execute(sa.select(S.c.reason)).scalars().all() == ["complaint"]  # bo's complaint only
    assert consent(engine, ann, "email") is True
    assert consent(engine, world["bo"], "email") is False


def test_sendgrid_free_text_with_nul_is_stored_without_it(world):
    c, engine = world["client"], world["engine"]
    batch = [sg("click", "k1", url="https://shop.example/\x00sale"),
             sg("bounce", "b2", email="bo@example.com", mid="m_bo", type="blocked", reason="4.7.1 \x00 blocked")]
    assert post_sg(c, batch).status_code == 200
    rows = dict(events(engine, E.c.kind, sa.func.coalesce(E.c.url, E.c.reason)))
    assert rows == {"clicked": "https://shop.example/sale", "bounced": "4.7.1  blocked"}


# -- Twilio -----------------------------------------------------------------------------------------------------------


def post_twilio(client, path: str, params: dict, query: str = ""):
    url = f"{PUBLIC}{path}" + (f"?{query}" if query else "")
    return client.post(path + (f"?{query}" if query else ""), content=urlencode(params),
                       headers={"Content-Type": "application/x-www-form-urlencoded",
                                "X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url, params)})


def inbound(body: str, sid: str, sender: str) -> dict:
    return {"MessageSid": sid, "AccountSid": "AC" + "1" * 32, "From": sender, "To": "+15005550006", "Body": body}


def test_twilio_stop_from_an_unusable_number_changes_nothing_and_a_valid_stop_still_works(world):
    c, engine, ann, bo = world["client"], world["engine"], world["ann"], world["bo"]
    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("退訂", "SM1", "+886912345678\x00"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert "<Message>" not in r.text  # no confirmation to a number we could not use
    assert consent(engine, ann, "sms") is True
    with engine.connect() as conn:
        assert count(engine, S) == 0
        assert conn.execute(sa.select(E.c.kind, E.c.member_id)).all() == [("inbound", None)]

    r = post_twilio(c, "/webhooks/twilio/inbound", inbound("退訂", "SM2", "+886987654321"))
    assert r.status_code == 200 and "已取消優惠簡訊" in r.text
    assert consent(engine, bo, "sms") is False


@pytest.mark.parametrize("where", ["MessageSid", "mid", "To"])
def test_twilio_status_callback_with_nul_is_stored_once(world, where):
    c, engine, ann = world["client"], world["engine"], world["ann"]
    params = {"MessageSid": "SM0123456789abcdef0123456789abcdef", "AccountSid": "AC" + "1" * 32,
              "From": "+15005550006", "To": "+886912345678", "MessageStatus": "undelivered", "ErrorCode": "21211"}
    query = "mid=m_ann&ik=k%7C1"
    if where == "mid":
        query = "mid=m_a%00nn&ik=k%00"
    else:
        params[where] = params[where][:5] + "\x00" + params[where][5:]
    for _ in range(2):  # Twilio's retry
        assert post_twilio(c, "/webhooks/twilio/status", params, query).status_code == 204
    [row] = events(engine, E.c.kind, E.c.message_id, E.c.provider_message_id, E.c.member_id, E.c.raw)
    assert row.kind == "bounced" and row.member_id == ann
    assert row.message_id == (None if where == "mid" else "m_ann")
    assert row.provider_message_id == (None if where == "MessageSid" else params["MessageSid"])
    raw = json.loads(row.raw)
    assert raw["_query"]["mid"] == ("m_a\x00nn" if where == "mid" else "m_ann") and raw["To"] == params["To"]
    # 21211 suppresses the number. An unusable To counts as absent, as in a callback without one: the number
    # of the member the message was for (found through our id) is suppressed.
    assert count(engine, S) == 1


# -- Push tracking ----------------------------------------------------------------------------------------------------


def post_push(client, payload=None, *, body: bytes | None = None):
    raw = json.dumps(payload).encode() if body is None else body
    return client.post("/track/push", content=raw,
                       headers={"Content-Type": "application/json",
                                APP_SIGNATURE: sign_push_tracking(PUSH_SECRET, raw)})


def test_push_batch_rejects_bad_reports_one_by_one_and_keeps_the_valid_ones(world):
    c, engine, ann = world["client"], world["engine"], world["ann"]
    at = (NOW - timedelta(minutes=5)).isoformat()
    batch = [
        {"event_id": "r1", "message_id": "m_ann", "event": "opened", "occurred_at": at},
        {"event_id": "r2", "message_id": "m_a\x00nn", "event": "opened", "occurred_at": at},
        {"event_id": "r3", "token": "tok-ann-\x000123456789", "event": "unregistered", "occurred_at": at},
        {"event_id": "r\x004", "message_id": "m_bo", "event": "received", "occurred_at": at},
        {"event_id": "r5", "message_id": "m_bo", "event": "received", "occurred_at": "2001-01-01T00:00:00Z"},
        {"event_id": "r6", "event": "opened", "occurred_at": at},
        {"event_id": "r7", "token": "tok-ann-0123456789", "event": "unregistered", "occurred_at": at},
    ]
    r = post_push(c, batch)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["received"], answer["stored"], answer["duplicates"]) == (7, 2, 0)
    assert answer["rejected"] == [
        {"index": 1, "error": "message_id is not a usable id (a string of at most 32 characters without control "
                              "characters)"},
        {"index": 2, "error": "token is not a usable id (a string of at most 4096 characters without control "
                              "characters)"},
        {"index": 3, "error": "event_id contains control characters"},
        {"index": 4, "error": "occurred_at outside the accepted window"},
        {"index": 5, "error": "a push report needs message_id or token"},
    ]
    assert events(engine, E.c.provider_event_id, E.c.member_id) == [("ev:r1", ann), ("ev:r7", ann)]
    d = Device.__table__
    with engine.connect() as conn:
        assert conn.execute(sa.select(d.c.invalid_reason)).scalar() == "unregistered"  # r7 took effect
    # The app resends the whole queue: the stored ones are duplicates, the rejected ones rejected again.
    again = post_push(c, batch).json()
    assert (again["stored"], again["duplicates"], len(again["rejected"])) == (0, 2, 5)


def test_push_report_that_is_only_bad_is_a_400_with_the_reason(world):
    at = NOW.isoformat()
    r = post_push(world["client"], {"message_id": "m\x00", "event": "opened", "occurred_at": at})
    assert r.status_code == 400
    assert r.json() == {"error": "message_id is not a usable id (a string of at most 32 characters without control "
                                 "characters)"}
    assert count(world["engine"], E) == 0


# -- Triggers ---------------------------------------------------------------------------------------------------------


def post_trigger(client, event: str, payload=None, *, body: bytes | None = None, signed: bool = True):
    raw = json.dumps(payload).encode() if body is None else body
    headers = {APP_SIGNATURE: sign_push_tracking(TRIGGER_SECRET, raw)} if signed else {}
    return client.post(f"/triggers/{event}", content=raw, headers=headers)


@pytest.mark.parametrize("payload, error", [
    ({"member": "M\x001"}, "member must be at most 200 characters without control characters"),
    ({"member": "M1", "order": "O\x0012"}, "order must be at most 200 characters without control characters"),
    ({"member": "M1", "ref": "x" * 201}, "ref must be at most 200 characters without control characters"),
    ({"member": "M1", "order": {"id": 1}}, "order must be a string or an integer"),
    ({"member": True}, "body must be a JSON object with a member"),
])
def test_trigger_fields_with_control_characters_are_a_400_naming_the_field(world, payload, error):
    r = post_trigger(world["client"], "review.negative", payload)
    assert r.status_code == 400 and r.json() == {"error": error}


def test_trigger_event_name_with_a_control_character_is_a_400(world):
    r = post_trigger(world["client"], "review%01negative", {"member": "M1"})
    assert r.status_code == 400
    assert r.json() == {"error": "the event name must be at most 200 characters without control characters"}


def test_trigger_member_number_beyond_64_bits_is_a_422_not_a_retryable_503(world, tmp_path):
    started = []
    app = FastAPI()
    app.include_router(build_trigger_router(world["engine"], TriggerConfig(TRIGGER_SECRET),
                                            Settings(home=tmp_path / "home", secret_key="s" * 32),
                                            starter=lambda params: started.append(params) or "run-1"))
    r = post_trigger(TestClient(app), "review.negative", {"member": "9" * 25})
    assert r.status_code == 422 and r.json() == {"error": "a value in the request is out of range for the database"}
    assert not started


# -- Member links -----------------------------------------------------------------------------------------------------


# Tokens naming a member id no member can have (0, >= 2**63): signing refuses them and a presented one gets the
# invalid-link page (403), never a 500: tests/test_bounds.py.


def test_page_form_with_nul_changes_nothing_but_what_it_names(world):
    c, engine, bo = world["client"], world["engine"], world["bo"]
    token = sign_member_token(bo, SECRET)
    r = c.post(f"/u/{token}", content="action=unsub%00scribe",
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json() == {"error": "unknown form action"}
    r = c.post(f"/u/{token}", content="action=save&consent.email.marketing=on&consent.sms.mark%00eting=on",
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    assert consent(engine, bo, "email") is True and consent(engine, bo, "sms") is False


# -- Deeply nested, malformed and non-UTF-8 JSON ----------------------------------------------------------------------


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_deep_json_is_a_400_before_anything_is_parsed_or_stored(world):
    c, engine = world["client"], world["engine"]
    too_deep = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    bomb = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json.loads without the bound

    r = post_sg(c, bomb)
    assert r.status_code == 400 and r.json() == {"error": too_deep}
    # One deep field inside an otherwise valid batch: the batch is refused whole (SendGrid's bodies are 3
    # levels deep; this is not SendGrid), and nothing of it is stored.
    r = post_sg(c, [sg("unsubscribe", "u9", email="bo@example.com", mid="m_bo", extra=nested(MAX_JSON_DEPTH))])
    assert r.status_code == 400 and r.json() == {"error": too_deep}
    assert count(engine, E) == 0 and consent(engine, world["bo"], "email") is True
    # At the limit it is accepted (the event is an array, the event an object: 2 levels of the budget).
    r = post_sg(c, [sg("open", "o9", extra=nested(MAX_JSON_DEPTH - 2))])
    assert r.status_code == 200 and r.json()["stored"] == 1

    r = post_push(c, body=bomb)
    assert r.status_code == 400 and r.json() == {"error": too_deep}
    r = post_push(c, body=b'{"a":' * 5_000 + b"1" + b"}" * 5_000)
    assert r.status_code == 400 and r.json() == {"error": too_deep}

    r = post_trigger(c, "review.negative", body=b'{"member": "M1", "x": ' + b"[" * 3_000 + b"]" * 3_000 + b"}")
    assert r.status_code == 400 and r.json() == {"error": too_deep}
    assert count(engine, E) == 1


@pytest.mark.parametrize("body, error", [
    (b'[{"event": "open", "timestamp": NaN}]', "not JSON: NaN is not a JSON number"),
    (b'[{"event": "open", "timestamp": 1e999}]', "not JSON: number out of range"),
    (b'[{"event": "open", "x": -Infinity}]', "not JSON: -Infinity is not a JSON number"),
    ('[{"event": "open"}]'.encode("utf-16"), "body is not UTF-8"),
])
def test_json_that_postgresql_could_not_store_is_a_400(world, body, error):
    """NaN and infinities are not JSON; PostgreSQL's json type refuses them, so storing would fail the batch."""
    r = post_sg(world["client"], body)
    assert r.status_code == 400 and r.json() == {"error": error}
    assert count(world["engine"], E) == 0


def test_non_utf8_bodies_are_a_400_on_every_endpoint(world):
    c, engine = world["client"], world["engine"]
    latin1 = '[{"email": "zoë@example.com"}]'.encode("latin-1")
    r = post_sg(c, latin1)
    assert r.status_code == 400 and r.json() == {"error": "body is not UTF-8"}
    r = post_push(c, body=latin1)
    assert r.status_code == 400 and r.json() == {"error": "body is not UTF-8"}
    r = post_trigger(c, "review.negative", body=b'{"member": "M\xff"}')
    assert r.status_code == 400 and r.json() == {"error": "body is not UTF-8"}
    r = c.post("/webhooks/twilio/inbound", content=b"Body=STOP\xfe&From=%2B886912345678",
               headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"})
    assert r.status_code == 400 and r.json() == {"error": "body is not UTF-8"}
    r = c.post(f"/u/{sign_member_token(world['ann'], SECRET)}", content=b"action=\xc3(",
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json() == {"error": "body is not UTF-8"}
    assert count(engine, E) == 0


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _random_json(rng: random.Random, depth: int):
    if depth == 0:
        return rng.choice([1, None, "plain", "a[{", 'q"]}', "\\", "]]", "", '"{', "\\\"[", "ü]"])
    if rng.random() < 0.5:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", "[", '"', "\\", "}"]) + str(i): _random_json(rng, depth - 1)
            for i in range(rng.randint(0, 3))}


def test_depth_scan_agrees_with_the_parsed_depth():
    """Brackets inside strings (with escaped quotes and backslashes) never count, also across scan chunks."""
    rng = random.Random(14)
    for _ in range(1500):
        doc = _random_json(rng, rng.randint(0, 8))
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        depth = _depth(doc)
        for limit in range(0, 10):
            assert json_too_deep(body, limit) is (depth > limit), (body, limit)
    # Over 1 MiB of structure: the scan goes chunk by chunk, carrying depth and string state across chunks.
    wide = json.dumps([{"s": '"]]]', "t": ["[[["] * 3} for _ in range(150_000)]).encode()
    assert not json_too_deep(wide, 3) and json_too_deep(wide, 2)
    deep_at_the_end = wide[:-1] + b"," + json.dumps(nested(40)).encode() + b"]"
    assert json_too_deep(deep_at_the_end, 32) and not json_too_deep(deep_at_the_end, 41)
    with pytest.raises(MalformedPayload, match="nested deeper"):
        loads_json(deep_at_the_end)


# -- Body size --------------------------------------------------------------------------------------------------------


LIMITS = [("/webhooks/sendgrid", SENDGRID_MAX_BODY), ("/webhooks/twilio/status", TWILIO_MAX_BODY),
          ("/webhooks/twilio/inbound", TWILIO_MAX_BODY), ("/track/push", PUSH_MAX_BODY),
          ("/triggers/review.negative", TRIGGER_MAX_BODY), ("/u/some-token", PAGE_MAX_BODY), ("/healthz", 64 * 1024)]


@pytest.mark.parametrize("path, limit", LIMITS)
def test_body_over_the_limit_is_a_413_and_at_the_limit_is_read(world, path, limit):
    c = world["client"]
    r = c.post(path, content=b"x" * (limit + 1))
    assert r.status_code == 413, path
    assert r.json() == {"error": f"body too large: at most {limit} bytes accepted here"}
    assert r.headers["connection"] == "close"
    # At the limit the body passes the size check (and fails later, on authentication or shape).
    assert c.post(path, content=b"x" * limit).status_code != 413
    assert count(world["engine"], E) == 0


class Upload:
    """A request body that never ends, counting what the server pulled from it."""

    def __init__(self, chunk_size: int = 4096, total: int = 300 * 1024 * 1024):
        self.chunk, self.total, self.pulled = b"[" * chunk_size, total, 0

    def __iter__(self):
        while self.pulled < self.total:
            self.pulled += len(self.chunk)
            yield self.chunk


def asgi_post(app, path: str, chunks, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict]:
    """POST ``chunks`` to the ASGI app as a server does for a chunked upload (no Content-Length)."""
    messages = iter(chunks)
    sent: list[dict] = []

    async def receive():
        try:
            return {"type": "http.request", "body": next(messages), "more_body": True}
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"transfer-encoding", b"chunked"), *headers],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.mark.parametrize("path, limit, headers", [
    ("/triggers/review.negative", TRIGGER_MAX_BODY, [(APP_SIGNATURE.lower().encode(), b"sha256=00")]),
    ("/webhooks/sendgrid", SENDGRID_MAX_BODY, [(k.lower().encode(), v.encode()) for k, v in SIGNER.sign(b"").items()]),
    ("/track/push", PUSH_MAX_BODY, [(APP_SIGNATURE.lower().encode(), b"sha256=00")]),
])
def test_chunked_upload_is_cut_off_at_the_limit(world, path, limit, headers):
    """The 300 MB upload that used to be read whole: the server stops pulling one chunk past the limit."""
    upload = Upload()
    status, answer = asgi_post(world["app"], path, upload, headers)
    assert status == 413 and answer == {"error": f"body too large: at most {limit} bytes accepted here"}
    assert limit < upload.pulled <= limit + len(upload.chunk)


def test_unsigned_chunked_upload_is_refused_without_reading_it(world):
    upload = Upload()
    status, answer = asgi_post(world["app"], "/triggers/review.negative", upload)
    assert status == 401 and answer == {"error": "missing signature"}
    assert upload.pulled == 0


def test_chunked_non_utf8_is_refused_at_the_first_bad_chunk(world):
    chunks = Upload(total=10 * 4096)
    chunks.chunk = b'{"member": "\xff'
    status, answer = asgi_post(world["app"], "/track/push", chunks, [(APP_SIGNATURE.lower().encode(), b"sha256=00")])
    assert status == 400 and answer == {"error": "body is not UTF-8"}
    assert chunks.pulled == len(chunks.chunk)


def test_invalid_content_length_is_a_400(world):
    status, answer = asgi_post(world["app"], "/track/push", [b"{}"], [(b"content-length", b"12abc")])
    assert status == 400 and answer == {"error": "invalid Content-Length"}


class Served:
    """``create_app`` served by uvicorn on loopback, as ``membercare serve`` runs it."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="hostile-receiver", daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def raw(self, head: bytes, body: bytes = b"") -> bytes:
        """Send ``head`` (and ``body``), then read until the server closes the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(head + body)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data


def test_real_server_answers_413_to_a_300_mb_content_length_without_waiting_for_the_body(world):
    with Served(world["app"]) as served:
        # Only the head is sent: the answer must come without the server waiting for (or reading) the body.
        answer = served.raw(b"POST /triggers/review.negative HTTP/1.1\r\nHost: x\r\nContent-Length: 314572800\r\n"
                            b"Content-Type: application/json\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert answer.endswith(b'{"error":"body too large: at most 16384 bytes accepted here"}')
        # Chunked, with no end: one chunk just over the limit is enough for the answer.
        chunk = b"[" * (TRIGGER_MAX_BODY + 1)
        answer = served.raw(b"POST /triggers/review.negative HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            + APP_SIGNATURE.encode() + b": sha256=00\r\n\r\n",
                            b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 413 ")

