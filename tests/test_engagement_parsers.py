"""Provider payloads (shaped like the providers' documented ones) -> normalised EngagementEvents."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from channels.fcm.events import parse_push_body
from channels.sendgrid.events import parse_sendgrid_body, provider_message_id
from channels.twilio.events import classify_inbound, parse_inbound, parse_status_callback, twilio_handles_reply
from membercare.engagement.events import BounceClass, EventKind, InboundCommand, MalformedPayload

TS = 1_763_900_000  # 2025-11-23T12:13:20Z


def sg(event: str, **extra) -> dict:
    base = {
        "email": "Ann@Example.com",
        "timestamp": TS,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": event,
        "category": ["birthday"],
        "sg_event_id": f"sg-{event}-{extra.get('type', '')}",
        "sg_message_id": "Xg7_ZjmHSpiC3aiHvhuP2w.filterdrecv-p3iad2-8ddf98858-xk4v8-19-5C6F2A79-5.0",
        "membercare_message_id": "m_0001",
        "membercare_idempotency_key": "birthday|2025-11-23|42",
    }
    base.update(extra)
    return base


def test_sendgrid_documented_event_types_map_to_the_taxonomy():
    body = json.dumps([
        sg("processed"),
        sg("dropped", reason="Bounced Address", status="5.0.0"),
        sg("delivered", response="250 OK"),
        sg("deferred", response="400 try again later", attempt="5"),
        sg("bounce", type="bounce", reason="500 unknown recipient", status="5.0.0"),
        sg("bounce", type="blocked", reason="550 blocked by policy", status="5.7.1"),
        sg("open", useragent="Mozilla/5.0", ip="198.51.100.1"),
        sg("click", url="https://shop.example.com/p/1?utm_source=membercare", url_offset={"index": 0, "type": "html"}),
        sg("spamreport"),
        sg("unsubscribe"),
        sg("group_unsubscribe", asm_group_id=10),
        sg("group_resubscribe", asm_group_id=10),
        sg("brand_new_event_type"),
    ]).encode()
    events = parse_sendgrid_body(body)
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.QUEUED, EventKind.REJECTED, EventKind.DELIVERED, EventKind.DEFERRED, EventKind.BOUNCED,
        EventKind.BOUNCED, EventKind.OPENED, EventKind.CLICKED, EventKind.COMPLAINED, EventKind.UNSUBSCRIBED,
        EventKind.UNSUBSCRIBED, EventKind.RESUBSCRIBED, EventKind.UNKNOWN,
    ]
    hard, soft = events[4], events[5]
    assert hard.bounce_class is BounceClass.HARD and soft.bounce_class is BounceClass.SOFT
    assert hard.reason == "500 unknown recipient"
    assert events[1].suppress == "hard_bounce"  # dropped "Bounced Address" mirrors SendGrid's suppression
    assert events[7].url == "https://shop.example.com/p/1?utm_source=membercare"
    assert all(e.url is None for e in events if e.kind is not EventKind.CLICKED)
    first = events[0]
    assert first.message_id == "m_0001"
    assert first.provider_message_id == "Xg7_ZjmHSpiC3aiHvhuP2w"
    assert first.dedupe_key == "sg:sg-processed-"
    assert first.occurred_at == datetime.fromtimestamp(TS, UTC)
    assert first.recipient == "Ann@Example.com"
    # The raw payload is kept whole, including fields we do not map.
    assert events[10].raw["asm_group_id"] == 10
    assert events[12].raw["event"] == "brand_new_event_type" and "brand_new_event_type" in events[12].reason


def test_sendgrid_odd_elements_become_unknown_instead_of_being_dropped():
    events = parse_sendgrid_body(json.dumps([42, {"event": "open"}, sg("open", timestamp="garbage")]).encode())
    assert [e.kind for e in events] == [EventKind.UNKNOWN] * 3
    assert events[0].raw == {"payload": 42}
    # Without sg_event_id the key is a hash of the payload: the same payload gives the same key.
    again = parse_sendgrid_body(json.dumps([{"event": "open"}]).encode())
    assert again[0].dedupe_key == events[1].dedupe_key


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"event": "open"}', b"\xff\xfe"])
def test_sendgrid_body_that_is_not_a_json_array_is_malformed(body):
    with pytest.raises(MalformedPayload):
        parse_sendgrid_body(body)


def test_sendgrid_message_id_variants():
    assert provider_message_id("abc.filter0001.16648.5515E0B88.0") == "abc"
    assert provider_message_id("Xg7_ZjmHSpiC3aiHvhuP2w") == "Xg7_ZjmHSpiC3aiHvhuP2w"
    assert provider_message_id("14c5d75ce93.dfd.64b469") == "14c5d75ce93"
    assert provider_message_id(None) is None


def status(**extra) -> dict:
    base = {"MessageSid": "SM" + "a" * 32, "AccountSid": "AC" + "b" * 32, "From": "+15005550006",
            "To": "+886912345678", "ApiVersion": "2010-04-01", "SmsSid": "SM" + "a" * 32}
    base.update(extra)
    return base


@pytest.mark.parametrize(
    "message_status,code,kind,bounce,reason",
    [
        ("queued", "", EventKind.QUEUED, None, None),
        ("sent", "", EventKind.SENT, None, None),
        ("delivered", "", EventKind.DELIVERED, None, None),
        ("undelivered", "30003", EventKind.BOUNCED, BounceClass.SOFT, "30003"),
        ("undelivered", "30005", EventKind.BOUNCED, BounceClass.HARD, "30005"),
        ("failed", "30008", EventKind.FAILED, None, "30008"),
        ("failed", "21211", EventKind.BOUNCED, BounceClass.HARD, "21211"),
        ("failed", "21610", EventKind.REJECTED, None, "opted_out"),
        ("read", "", EventKind.OPENED, None, None),
        ("weird", "", EventKind.UNKNOWN, None, "unmapped"),
    ],
)
def test_twilio_status_callbacks(message_status, code, kind, bounce, reason):
    params = status(MessageStatus=message_status, SmsStatus=message_status)
    if code:
        params["ErrorCode"] = code
    event = parse_status_callback(params, {"mid": "m_0002", "ik": "x"})
    assert event.kind is kind and event.bounce_class is bounce
    if reason:
        assert event.reason.startswith(reason)
    assert event.message_id == "m_0002"
    assert event.provider_message_id == params["MessageSid"]
    assert event.dedupe_key == f"status:{params['MessageSid']}:{message_status}"
    assert event.raw["_query"]["mid"] == "m_0002"
    assert event.recipient == "+886912345678"
    assert (event.suppress == "invalid") == (code in {"30005", "21211"})


def test_twilio_status_without_sid_or_status_is_malformed():
    with pytest.raises(MalformedPayload):
        parse_status_callback({"MessageStatus": "sent"})
    with pytest.raises(MalformedPayload):
        parse_status_callback({"MessageSid": "SM1"})


@pytest.mark.parametrize(
    "body,command",
    [
        ("STOP", InboundCommand.STOP), (" stop ", InboundCommand.STOP), ("StopAll", InboundCommand.STOP),
        ("UNSUBSCRIBE", InboundCommand.STOP), ("cancel", InboundCommand.STOP), ("End", InboundCommand.STOP),
        ("QUIT", InboundCommand.STOP), ("revoke", InboundCommand.STOP), ("OPTOUT", InboundCommand.STOP),
        ("取消", InboundCommand.STOP), ("退訂", InboundCommand.STOP), ("退訂。", InboundCommand.STOP),
        ("ＳＴＯＰ", InboundCommand.STOP),  # full-width letters from a CJK keyboard
        ("START", InboundCommand.START), ("unstop", InboundCommand.START), ("Yes", InboundCommand.START),
        ("HELP", InboundCommand.HELP), ("info", InboundCommand.HELP),
        ("please stop", None), ("stopp", None), ("", None), ("謝謝", None),
    ],
)
def test_inbound_keywords(body, command):
    assert classify_inbound(body) is command


def test_inbound_event_and_who_answers():
    event = parse_inbound({"MessageSid": "SM123", "From": "+886912345678", "To": "+15005550006", "Body": "退訂"})
    assert event.kind is EventKind.INBOUND and event.command is InboundCommand.STOP
    assert event.recipient == "+886912345678" and event.dedupe_key == "inbound:SM123"
    # Twilio confirms its own keywords; the Chinese ones are ours to confirm.
    assert twilio_handles_reply("STOP") and not twilio_handles_reply("退訂")


def test_push_reports_single_and_batch():
    one = {"event_id": "e1", "message_id": "m_0003", "event": "opened", "occurred_at": "2025-11-23T12:00:00Z",
           "platform": "android", "token": "fcm-token-abcdefghijklmnop"}
    [event] = parse_push_body(json.dumps(one).encode())
    assert event.kind is EventKind.PUSH_OPENED and event.dedupe_key == "ev:e1"
    assert event.occurred_at == datetime(2025, 11, 23, 12, tzinfo=UTC)
    assert event.recipient == "fcm-token-abcdefghijklmnop"
    assert "token" not in event.raw and event.raw["token_hint"].startswith("fcm-")  # the token is a credential

    batch = [
        {"message_id": "m_0003", "event": "received", "timestamp": 1_763_900_000},
        {"message_id": "m_0003", "event": "dismissed", "timestamp": 1_763_900_000_000},  # milliseconds
        {"token": "dead-token", "event": "unregistered", "timestamp": "2025-11-23T12:00:00+08:00"},
    ]
    events = parse_push_body(json.dumps(batch).encode())
    assert [e.kind for e in events] == [EventKind.PUSH_RECEIVED, EventKind.PUSH_DISMISSED, EventKind.FAILED]
    assert events[0].occurred_at == events[1].occurred_at
    assert events[2].reason == "unregistered" and events[2].occurred_at.hour == 4
    # Without event_id the key is a hash of message_id + event + time: stable across resends.
    assert parse_push_body(json.dumps(batch).encode())[0].dedupe_key == events[0].dedupe_key
    assert events[0].dedupe_key != events[1].dedupe_key


@pytest.mark.parametrize(
    "payload",
    [b"nope", b"[]", b'{"event": "opened"}', b'{"message_id": "m", "event": "opened"}',
     b'{"message_id": "m", "event": "opened", "occurred_at": "2025-11-23T12:00:00"}', b"[1]"],
)
def test_push_malformed(payload):
    with pytest.raises(MalformedPayload):
        parse_push_body(payload)
