"""Storing engagement events once and applying their effects, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session

from channels.fcm.events import parse_push_body
from channels.sendgrid.events import parse_sendgrid_body
from channels.twilio.events import parse_inbound, parse_status_callback
from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.delivery.models import CampaignRun, OutboxMessage, Suppression, address_hash
from membercare.engagement.events import EngagementEvent, EventKind, Provider
from membercare.engagement.models import EngagementEventRow
from membercare.engagement.store import ingest, ingest_events
from membercare.models import ConsentEvent, Device, Member

T0 = datetime(2025, 11, 23, 12, tzinfo=UTC)


def seed(engine) -> dict:
    """Two members (one with a device), a campaign run and one outbox message per member."""
    with Session(engine, expire_on_commit=False) as s:
        ann = Member(external_id="M1", name="Ann", email="ann@example.com", phone="+886912345678", locale="en",
                     joined_at=T0 - timedelta(days=400))
        bo = Member(external_id="M2", name="博", email="Bo@Example.COM", phone="+886987654321", locale="zh-TW",
                    joined_at=T0 - timedelta(days=100))
        s.add_all([ann, bo])
        s.flush()
        run = CampaignRun(campaign="birthday", occurrence="2025-11-23", purpose="marketing", as_of=T0)
        s.add(run)
        s.flush()
        for member, mid in ((ann, "m_ann"), (bo, "m_bo")):
            s.add(OutboxMessage(message_id=mid, run_id=run.id, campaign="birthday", occurrence="2025-11-23",
                                member_id=member.id, idempotency_key=f"birthday|2025-11-23|{member.id}",
                                purpose="marketing", channel="email", state="sent", reason_code="sent",
                                reason="sent", scheduled_at=T0))
        s.add(Device(member_id=ann.id, token="tok-ann-1234567890", platform="android", app_id="shop",
                     last_seen_at=T0))
        s.commit()
    with engine.begin() as conn:
        record_consents(conn, [
            ConsentStatement(m, ch, "marketing", True, "signup_form", T0 - timedelta(days=30))
            for m in (ann.id, bo.id) for ch in ("email", "sms", "push")
        ])
    return {"ann": ann.id, "bo": bo.id}


def sg_event(event: str, mid: str | None = "m_ann", email="ann@example.com", **extra) -> dict:
    d = {"email": email, "timestamp": int(T0.timestamp()), "event": event, "sg_event_id": f"id-{event}-{mid}",
         "sg_message_id": "abc.filter1"}
    if mid:
        d["membercare_message_id"] = mid
    d.update(extra)
    return d


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table.__table__)).scalar()


def test_batch_is_stored_once_and_members_resolved(engine):
    ids = seed(engine)
    body = json.dumps([sg_event("delivered"), sg_event("open"), sg_event("click", url="https://x.test/a"),
                       sg_event("delivered", mid="m_bo", email="bo@example.com"),
                       sg_event("open", mid=None, email="BO@example.com")]).encode()
    events = parse_sendgrid_body(body)
    first = ingest_events(engine, events)
    assert (first.received, first.stored, first.duplicates) == (5, 5, 0)
    assert first.member_ids == [ids["ann"], ids["ann"], ids["ann"], ids["bo"], ids["bo"]]  # last: by address
    again = ingest_events(engine, parse_sendgrid_body(body))
    assert (again.stored, again.duplicates) == (0, 5)
    assert count(engine, EngagementEventRow) == 5
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.kind == "clicked")).mappings().one()
    assert row["url"] == "https://x.test/a" and row["message_id"] == "m_ann" and row["member_id"] == ids["ann"]
    assert row["provider_message_id"] == "abc" and row["occurred_at"] == T0
    assert json.loads(row["raw"])["sg_event_id"] == "id-click-m_ann"


def test_duplicates_inside_one_batch_are_stored_once(engine):
    seed(engine)
    e = sg_event("open")
    result = ingest_events(engine, parse_sendgrid_body(json.dumps([e, e, e]).encode()))
    assert (result.stored, result.duplicates) == (1, 2)
    assert count(engine, EngagementEventRow) == 1


def test_hard_bounce_suppresses_but_soft_does_not(engine):
    seed(engine)
    events = parse_sendgrid_body(json.dumps([
        sg_event("bounce", type="bounce", reason="550 no such user"),
        sg_event("bounce", mid="m_bo", email="Bo@Example.COM", type="blocked", reason="554 blocked"),
    ]).encode())
    result = ingest_events(engine, events)
    assert result.suppressed == 1
    s = Suppression.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(s.c.channel, s.c.address_hash, s.c.reason, s.c.source)).all()
    assert rows == [("email", address_hash("email", "ann@example.com"), "hard_bounce", "sendgrid:bounced")]
    # Redelivery does not duplicate or fail on the unique suppression.
    assert ingest_events(engine, events).suppressed == 0


def test_complaint_suppresses_and_revokes_email_marketing(engine):
    ids = seed(engine)
    ingest_events(engine, parse_sendgrid_body(json.dumps([sg_event("spamreport")]).encode()))
    with engine.connect() as conn:
        consents = current_consents(conn, ids["ann"])
        ev = ConsentEvent.__table__
        history = conn.execute(sa.select(ev.c.source, ev.c.granted).where(ev.c.member_id == ids["ann"],
                                                                          ev.c.channel == "email")
                               .order_by(ev.c.occurred_at)).all()
    assert consents[("email", "marketing")] is False and consents[("sms", "marketing")] is True
    assert history[-1] == ("complaint", False)
    assert count(engine, Suppression) == 1


def test_sendgrid_unsubscribe_and_resubscribe(engine):
    ids = seed(engine)
    unsub = sg_event("group_unsubscribe", mid="m_bo", email="bo@example.com", asm_group_id=3)
    ingest_events(engine, parse_sendgrid_body(json.dumps([unsub]).encode()))
    with engine.connect() as conn:
        assert current_consents(conn, ids["bo"])[("email", "marketing")] is False
    resub = sg_event("group_resubscribe", mid="m_bo", email="bo@example.com", timestamp=int(T0.timestamp()) + 60)
    ingest_events(engine, parse_sendgrid_body(json.dumps([resub]).encode()))
    with engine.connect() as conn:
        assert current_consents(conn, ids["bo"])[("email", "marketing")] is True


def _inbound(body: str, sid: str, sender="+886912345678", at=None):
    return parse_inbound({"MessageSid": sid, "From": sender, "To": "+15005550006", "Body": body}, received_at=at)


def test_stop_revokes_sms_marketing_with_history_and_start_restores(engine):
    ids = seed(engine)
    result = ingest_events(engine, [_inbound("STOP", "SM1", at=T0)])
    assert result.consent_changes == 1 and result.member_ids == [ids["ann"]]
    ev = ConsentEvent.__table__
    with engine.connect() as conn:
        assert current_consents(conn, ids["ann"])[("sms", "marketing")] is False
        assert current_consents(conn, ids["ann"])[("email", "marketing")] is True
        src = conn.execute(sa.select(ev.c.source, ev.c.detail)
                           .where(ev.c.member_id == ids["ann"], ev.c.channel == "sms")
                           .order_by(ev.c.occurred_at.desc())).first()
    assert src.source == "sms_stop" and "inbound:SM1" in src.detail
    # The same webhook again: stored once, no second history row.
    assert ingest_events(engine, [_inbound("STOP", "SM1", at=T0 + timedelta(seconds=5))]).stored == 0
    ingest_events(engine, [_inbound("start", "SM2", at=T0 + timedelta(minutes=1))])
    with engine.connect() as conn:
        assert current_consents(conn, ids["ann"])[("sms", "marketing")] is True
        sources = [r.source for r in conn.execute(sa.select(ev.c.source).where(
            ev.c.member_id == ids["ann"], ev.c.channel == "sms").order_by(ev.c.occurred_at))]
    assert sources == ["signup_form", "sms_stop", "sms_start"]


def test_stop_from_unknown_number_suppresses_the_number_and_start_lifts_it(engine):
    seed(engine)
    ingest_events(engine, [_inbound("退訂", "SM9", sender="+886900000000", at=T0)])
    s = Suppression.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(s.c.channel, s.c.address_hash, s.c.reason)).all()
    assert rows == [("sms", address_hash("sms", "+886900000000"), "unsubscribe")]
    ingest_events(engine, [_inbound("START", "SM10", sender="+886900000000", at=T0 + timedelta(minutes=1))])
    assert count(engine, Suppression) == 0


def test_twilio_21610_revokes_and_21211_suppresses(engine):
    ids = seed(engine)
    base = {"AccountSid": "AC1", "From": "+15005550006", "MessageStatus": "failed"}
    events = [
        parse_status_callback({**base, "MessageSid": "SMa", "To": "+886987654321", "ErrorCode": "21610"},
                              {"mid": "m_bo"}, received_at=T0),
        parse_status_callback({**base, "MessageSid": "SMb", "ErrorCode": "21211"}, {"mid": "m_ann"}, received_at=T0),
    ]
    ingest_events(engine, events)
    s = Suppression.__table__
    with engine.connect() as conn:
        assert current_consents(conn, ids["bo"])[("sms", "marketing")] is False
        # The callback had no "To": the resolved member's number is suppressed.
        rows = conn.execute(sa.select(s.c.address_hash, s.c.reason)).all()
    assert rows == [(address_hash("sms", "+886912345678"), "invalid")]


def test_unregistered_token_invalidates_the_device(engine):
    seed(engine)
    report = {"token": "tok-ann-1234567890", "event": "unregistered", "occurred_at": T0.isoformat()}
    result = ingest_events(engine, parse_push_body(json.dumps(report).encode()))
    assert result.devices_invalidated == 1
    d = Device.__table__
    with engine.connect() as conn:
        row = conn.execute(sa.select(d.c.invalidated_at, d.c.invalid_reason)).one()
    assert row.invalidated_at == T0 and row.invalid_reason == "unregistered"
    # A dispatcher can report the same through ingest (FCM said UNREGISTERED).
    event = EngagementEvent(provider=Provider.MEMBERCARE, dedupe_key="fcm:x", kind=EventKind.FAILED, channel="push",
                            occurred_at=T0, reason="unregistered", recipient="tok-ann-1234567890")
    assert ingest_events(engine, [event]).devices_invalidated == 0  # already invalid: unchanged


def test_effects_roll_back_with_the_events(engine):
    ids = seed(engine)
    try:
        with engine.begin() as conn:
            ingest(conn, [_inbound("STOP", "SM1", at=T0)])
            raise RuntimeError("crash before commit")
    except RuntimeError:
        pass
    assert count(engine, EngagementEventRow) == 0
    with engine.connect() as conn:
        assert current_consents(conn, ids["ann"])[("sms", "marketing")] is True


def test_hostile_strings_are_stored_not_fatal(engine):
    """A NUL character or a huge field must not make a batch fail (the provider would retry it forever)."""
    seed(engine)
    e = sg_event("click", url="https://x.test/\x00a", sg_event_id="x" * 300, note="nul \x00 inside")
    result = ingest_events(engine, parse_sendgrid_body(json.dumps([e]).encode()))
    assert result.stored == 1
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        row = conn.execute(sa.select(t.c.url, t.c.raw, t.c.provider_event_id)).one()
    assert row.url == "https://x.test/a"
    assert json.loads(row.raw)["note"] == "nul \x00 inside"
    assert len(row.provider_event_id) <= 128


def test_lone_surrogates_do_not_poison_a_batch(engine):
    seed(engine)
    body = b'[{"email": "ann@example.com", "timestamp": 1763900000, "event": "open", "sg_event_id": "s1", ' \
           b'"membercare_message_id": "m_ann", "useragent": "bad \\ud800 agent", "ok": "\\ud83d\\ude00"}]'
    result = ingest_events(engine, parse_sendgrid_body(body))
    assert result.stored == 1
    t = EngagementEventRow.__table__
    with engine.connect() as conn:
        raw = json.loads(conn.execute(sa.select(t.c.raw)).scalar())
    assert raw["useragent"] == "bad \ufffd agent" and raw["ok"] == "\U0001F600"
