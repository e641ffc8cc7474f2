"""Settling ``unknown`` rows from the providers' own records, through the real SDKs and the sandbox.

* Twilio: an SMS accepted whose answer was lost (the sandbox's ``ghost`` fault) ends ``sent`` through the
  message list (``GET .../Messages.json``), without ``MEMBERCARE_PUBLIC_URL``; an SMS the sandbox never
  accepted (the connection dropped before acceptance) is confirmed never received once Twilio could no
  longer hold it queued, and is sent exactly once; absence is not concluded when the list is ambiguous,
  when the member's record changed, or when the lookup fails.
* SendGrid: the Event Webhook (signed, through the real receiver) settles ghosts; with the stream trusted,
  a message with no event at all past the grace period is confirmed never received and sent exactly once.
* FCM: no lookup exists, so an unknown push row stays ``unknown`` (never resent).

Time: the sends run on the real clock (planner, dispatcher and sandbox stamp their own times); every
reconciliation gets its ``now`` injected, computed from the rows' own timestamps. No sleeps.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from urllib.parse import parse_qsl

import httpx
import pytest
import sqlalchemy as sa

from channels.base import OutboundMessage, SmsContent
from channels.registry import build_channels, close_channels
from channels.twilio.adapter import TwilioConfig, TwilioSmsChannel
from membercare.delivery.dispatcher import Dispatcher
from membercare.delivery.models import OutboxMessage
from membercare.delivery.provider_records import (
    CombinedRecords,
    SendGridEventRecords,
    TwilioListRecords,
    provider_records_from_env,
    trust_sendgrid_events,
)
from membercare.delivery.reconcile import reconcile_unknown, recover_stale
from membercare.errors import ConfigurationError
from membercare.models import Channel, Member, Purpose
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import TWILIO_FROM, TWILIO_SID, TWILIO_TOKEN, env_for
from test_delivery_e2e import FAST, NOPOLICY, QUIET, ledger, plan, seed
from test_engagement_e2e import Receiver

OB = OutboxMessage.__table__


def later(engine, run_id: int, by: timedelta) -> datetime:
    """The injected clock: ``by`` after the run's last ledger write."""
    with engine.connect() as conn:
        return conn.execute(sa.select(OB.c.updated_at).where(OB.c.run_id == run_id)
                            .order_by(OB.c.updated_at.desc()).limit(1)).scalar_one() + by


def accepted_per_message(sandbox, channel: str) -> Counter:
    return Counter(r["message_id"] for r in sandbox.messages(channel))


def assert_each_sent_exactly_once(sandbox, engine, run_id: int, channel: str) -> list[dict]:
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": len(rows)}
    accepted = accepted_per_message(sandbox, channel)
    assert accepted == Counter({r["message_id"]: 1 for r in rows}), "a message was accepted twice or never"
    assert sandbox.stats()["duplicates_by_message_id_total"] == 0
    by_mid = {r["message_id"]: r["provider_id"] for r in sandbox.messages(channel)}
    assert all(r["provider_message_id"] == by_mid[r["message_id"]] for r in rows)
    return rows


# Messages per lost-and-ghosted test: the sandbox draws its faults per request, so with rates of 0.3 fewer than
# two ghosts or drops among 40 is about 1e-5 likely (among 20 it was about 1.5 %).
N_LOST = 40


def dispatch_lost_and_ghosted(engine, sandbox, adapters, run_id: int, channel: str) -> tuple[int, int]:
    """Dispatch under ghost and drop faults; returns ``(ghosts, drops)``, each of them an ``unknown`` row."""
    rep = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
    faults = sandbox.stats()["faults"][channel]
    ghosts, drops = faults.get("ghost", 0), faults.get("drop", 0)
    assert ghosts >= 2 and drops >= 2 and rep.outcomes["unknown"] == ghosts + drops
    return ghosts, drops


def sms_env(sandbox, service_account) -> dict[str, str]:
    env = env_for(sandbox, service_account)
    del env["MEMBERCARE_PUBLIC_URL"]
    return env


# ---------------------------------------------------------------------------------------------------------------------
# Our id travels with every SMS


def test_status_callback_defaults_to_the_local_receiver_only_against_a_local_api():
    msg = OutboundMessage("m1", "k1", Channel.SMS, Purpose.MARKETING, "+886912345678",
                          SmsContent("x", "GSM-7", 1), "c", ())
    real = TwilioConfig(account_sid=TWILIO_SID, auth_token=TWILIO_TOKEN, from_number=TWILIO_FROM)
    local = TwilioConfig(account_sid=TWILIO_SID, auth_token=TWILIO_TOKEN, from_number=TWILIO_FROM,
                         base_url="http://127.0.0.1:8025")
    public = TwilioConfig(account_sid=TWILIO_SID, auth_token=TWILIO_TOKEN, from_number=TWILIO_FROM,
                          public_url="https://shop.example/mc/")
    # The real Twilio refuses a callback URL it cannot reach (21609): no callback there; the list lookup settles.
    assert real.status_callback(msg) is None
    assert local.status_callback(msg) == "http://127.0.0.1:8080/webhooks/twilio/status?mid=m1&ik=k1"
    assert public.status_callback(msg) == "https://shop.example/mc/webhooks/twilio/status?mid=m1&ik=k1"


# ---------------------------------------------------------------------------------------------------------------------
# The sandbox's message list


def _sms(adapter, mid: str, to: str, body: str):
    return adapter.send(OutboundMessage(mid, f"k-{mid}", Channel.SMS, Purpose.MARKETING, to,
                                        SmsContent(body, "GSM-7", 1), "c", ()))


def test_sandbox_lists_accepted_messages_ghosts_included_and_nothing_refused(sandbox, service_account):
    env = sms_env(sandbox, service_account)
    sandbox.configure(**QUIET)
    adapter = build_channels(env, channels=[Channel.SMS])[Channel.SMS]
    to = "+886912345678"
    try:
        sandbox.configure(sms={"ghost_rate": 1.0})
        assert [type(_sms(adapter, f"g{i}", to, f"ghost {i}")).__name__ for i in range(2)] == ["TransientFailure"] * 2
        sandbox.configure(sms={"ghost_rate": 0.0, "error_rate": 1.0})
        assert _sms(adapter, "e", to, "refused").__class__.__name__ == "TransientFailure"
        sandbox.configure(sms={"error_rate": 0.0, "drop_rate": 1.0})
        assert _sms(adapter, "d", to, "dropped").__class__.__name__ == "TransientFailure"
        sandbox.configure(sms={"drop_rate": 0.0})
        assert _sms(adapter, "ok", to, "fine").__class__.__name__ == "Accepted"
        assert _sms(adapter, "ok2", "+886912345679", "someone else").__class__.__name__ == "Accepted"
        assert _sms(adapter, "bad", "+8869", "invalid number").__class__.__name__ == "PermanentFailure"
        today = datetime.fromisoformat(sandbox.messages("sms")[0]["accepted_at"]).date()
        listed = adapter.list_messages(to, first_day=today, last_day=today)
        assert [m.body for m in listed] == ["fine", "ghost 1", "ghost 0"]  # newest first, accepted only
        assert {m.sid for m in listed} == {r["provider_id"] for r in sandbox.messages("sms")
                                           if r["message_id"] in ("g0", "g1", "ok")}
        assert adapter.list_messages(to, first_day=today + timedelta(days=1), last_day=today + timedelta(days=2)) == []
    finally:
        adapter.close()

    path = f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    auth = (TWILIO_SID, TWILIO_TOKEN)

    def bodies(**params) -> list[str]:
        resp = httpx.get(sandbox.url + path, params={"To": to, **params}, auth=auth)
        assert resp.status_code == 200, resp.text
        return [m["body"] for m in resp.json()["messages"]]

    day = today.isoformat()
    listed_today = ["fine", "ghost 1", "ghost 0"]
    assert bodies(**{"DateSent": day}) == bodies(**{"DateSent>": day, "DateSent<": day}) == listed_today
    assert bodies(**{"DateSent<": (today - timedelta(days=1)).isoformat()}) == []
    assert bodies(From="+886200000000") == [] and bodies(From=TWILIO_FROM) == listed_today
    first = httpx.get(sandbox.url + path, params={"To": to, "PageSize": 2}, auth=auth).json()
    assert [m["body"] for m in first["messages"]] == ["fine", "ghost 1"]
    second = httpx.get(sandbox.url + first["next_page_uri"], auth=auth).json()
    assert [m["body"] for m in second["messages"]] == ["ghost 0"] and second["next_page_uri"] is None
    assert second["previous_page_uri"] and second["page"] == 1 and second["start"] == 2
    assert all(m["date_sent"].endswith("+0000") and m["status"] == "sent" for m in first["messages"])
    assert httpx.get(sandbox.url + path, params={"To": to}, auth=(TWILIO_SID, "wrong")).status_code == 401
    bad = httpx.get(sandbox.url + path, params={"To": to, "PageSize": 0}, auth=auth)
    assert bad.status_code == 400 and bad.json()["code"] == 20001
    assert httpx.get(sandbox.url + path, params={"DateSent>": "not a date"}, auth=auth).status_code == 400


# ---------------------------------------------------------------------------------------------------------------------
# Twilio


def test_ghosted_sms_without_public_url_is_settled_sent_from_the_twilio_list(engine, sandbox, service_account):
    env = sms_env(sandbox, service_account)
    sandbox.configure(**QUIET, capture_requests=100, sms={"ghost_rate": 0.5})
    run_id = plan(engine, seed(engine, 16, preferred="sms"), channels=(Channel.SMS,), name="ghost-sms")
    adapters = build_channels(env, channels=[Channel.SMS])
    try:
        rep = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
        ghosts = sandbox.stats()["faults"]["sms"]["ghost"]
        assert 3 <= ghosts <= 13 and rep.outcomes["unknown"] == ghosts
        # Our id rides along in the status callback (membercare serve's default address, the API being local).
        forms = [dict(parse_qsl(c["body"])) for c in sandbox.captured() if c["method"] == "POST"]
        assert len(forms) == 16 and all(f["StatusCallback"].startswith(
            "http://127.0.0.1:8080/webhooks/twilio/status?mid=") for f in forms)

        records = TwilioListRecords(engine, adapters[Channel.SMS])
        report = reconcile_unknown(engine, run_id=run_id, records=records, grace=timedelta(hours=1),
                                   now=later(engine, run_id, timedelta(minutes=1)))
        assert (report.found_sent, report.never_received, report.left_unknown) == (ghosts, 0, 0)
        assert sandbox.stats()["lookups"]["sms"] == ghosts  # one list call per recipient
        rows = assert_each_sent_exactly_once(sandbox, engine, run_id, "sms")
        reconciled = [r for r in rows if r["reason_code"] == "reconciled"]
        assert len(reconciled) == ghosts and all("Twilio's message list has it" in r["reason"] for r in reconciled)
        # A rerun sends nothing.
        assert Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id).attempts == 0
        assert sum(accepted_per_message(sandbox, "sms").values()) == 16
    finally:
        close_channels(adapters)


def test_sms_the_provider_never_received_is_confirmed_and_sent_exactly_once(engine, sandbox, service_account):
    env = sms_env(sandbox, service_account)
    sandbox.configure(**QUIET, sms={"ghost_rate": 0.3, "drop_rate": 0.4})
    run_id = plan(engine, seed(engine, N_LOST, preferred="sms"), channels=(Channel.SMS,), name="lost-sms")
    adapters = build_channels(env, channels=[Channel.SMS])
    try:
        ghosts, drops = dispatch_lost_and_ghosted(engine, sandbox, adapters, run_id, "sms")
        records = TwilioListRecords(engine, adapters[Channel.SMS])

        # Soon after: ghosts are found; the dropped ones could still be queued at Twilio, so nothing is concluded.
        soon = reconcile_unknown(engine, run_id=run_id, records=records, grace=timedelta(hours=1),
                                 now=later(engine, run_id, timedelta(minutes=1)))
        assert (soon.found_sent, soon.never_received) == (ghosts, 0)
        assert Counter(r["state"] for r in ledger(engine, run_id))["unknown"] == drops

        # Once Twilio could no longer hold them queued: confirmed never received, marketing or not.
        settled = later(engine, run_id, records.settle_after + records.slack + timedelta(minutes=1))
        report = reconcile_unknown(engine, run_id=run_id, records=records, grace=timedelta(hours=1), now=settled)
        assert (report.found_sent, report.never_received, report.left_unknown) == (0, drops, 0)
        planned = [r for r in ledger(engine, run_id) if r["state"] == "planned"]
        assert len(planned) == drops and all(r["reason_code"] == "never_received" for r in planned)
        assert all("never received" in r["reason"] and "+886" not in r["reason"] for r in planned)

        sandbox.configure(sms={"ghost_rate": 0.0, "drop_rate": 0.0})
        again = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
        assert again.outcomes["sent"] == drops
        assert_each_sent_exactly_once(sandbox, engine, run_id, "sms")
    finally:
        close_channels(adapters)


def test_sms_in_flight_at_a_crash_that_never_reached_twilio_is_sent_exactly_once(engine, sandbox, service_account):
    """A dispatcher died after marking its attempt and before the provider call reached Twilio."""
    env = sms_env(sandbox, service_account)
    sandbox.configure(**QUIET)
    run_id = plan(engine, seed(engine, 4, preferred="sms"), channels=(Channel.SMS,), name="crash-sms")
    t = later(engine, run_id, timedelta(0))
    with engine.begin() as conn:
        conn.execute(sa.update(OB).where(OB.c.run_id == run_id).values(
            state="sending", claimed_by="dead/1", claimed_at=t, attempt_started_at=t, attempts=1, updated_at=t))
    assert recover_stale(engine, lease=timedelta(0), run_id=run_id, now=t).unknown == 4
    adapters = build_channels(env, channels=[Channel.SMS])
    try:
        records = TwilioListRecords(engine, adapters[Channel.SMS])
        report = reconcile_unknown(engine, run_id=run_id, records=records, grace=timedelta(hours=1),
                                   now=t + records.settle_after + records.slack + timedelta(minutes=1))
        assert (report.found_sent, report.never_received) == (0, 4)
        assert Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id).outcomes["sent"] == 4
    finally:
        close_channels(adapters)
    assert_each_sent_exactly_once(sandbox, engine, run_id, "sms")


def test_sms_absence_is_not_concluded_from_an_ambiguous_list_a_changed_member_or_a_failed_lookup(
        engine, sandbox, service_account):
    env = sms_env(sandbox, service_account)
    sandbox.configure(**QUIET, sms={"drop_rate": 1.0})
    ids = seed(engine, 3, preferred="sms")
    run_id = plan(engine, ids, channels=(Channel.SMS,), name="unsure-sms")
    adapters = build_channels(env, channels=[Channel.SMS])
    sms = adapters[Channel.SMS]
    wrong = TwilioSmsChannel(TwilioConfig(account_sid=TWILIO_SID, auth_token="not-the-token", from_number=TWILIO_FROM,
                                          base_url=sandbox.url))
    try:
        assert Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id).outcomes["unknown"] == 3
        sandbox.configure(sms={"drop_rate": 0.0})
        m = Member.__table__
        with engine.connect() as conn:
            phones = dict(conn.execute(sa.select(m.c.id, m.c.phone).where(m.c.id.in_(ids))).all())
        a, b, c = sorted(ids)
        # a: our sender texted a's number meanwhile with something no row records (Twilio could have altered
        # our body: smart encoding, redaction), so the list does not prove absence.
        assert _sms(sms, "other", phones[a], "a different text").__class__.__name__ == "Accepted"
        with engine.begin() as conn:  # b: the member's record changed after planning (the number may be new)
            conn.execute(sa.update(m).where(m.c.id == b).values(updated_at=later(engine, run_id, timedelta(0))))
        now = later(engine, run_id, timedelta(hours=12))

        failing = CombinedRecords([TwilioListRecords(engine, wrong)])  # 401: logged, nothing concluded
        none = reconcile_unknown(engine, run_id=run_id, records=failing, grace=timedelta(days=2), now=now)
        assert (none.found_sent, none.never_received) == (0, 0)

        report = reconcile_unknown(engine, run_id=run_id, records=TwilioListRecords(engine, sms),
                                   grace=timedelta(days=2), now=now)
        assert (report.found_sent, report.never_received) == (0, 1)
        with engine.connect() as conn:
            states = dict(conn.execute(sa.select(OB.c.member_id, OB.c.reason_code).where(OB.c.run_id == run_id)).all())
        assert states == {a: "ambiguous_failure", b: "ambiguous_failure", c: "never_received"}
        # Long past the queueing limit the list for those windows cannot change: it is not read again.
        asked = sandbox.stats()["lookups"]["sms"]
        reconcile_unknown(engine, run_id=run_id, records=TwilioListRecords(engine, sms), grace=timedelta(days=2),
                          now=later(engine, run_id, timedelta(days=30)))
        assert sandbox.stats()["lookups"]["sms"] == asked
    finally:
        close_channels(adapters)
        wrong.close()
    assert sandbox.stats()["duplicates_by_message_id_total"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# SendGrid


def test_sendgrid_event_stream_settles_ghosts_and_confirms_never_received_when_trusted(
        engine, sandbox, service_account):
    with Receiver(engine, sandbox.sendgrid_public_key) as receiver:
        env = {**env_for(sandbox, service_account), "MEMBERCARE_PUBLIC_URL": receiver.url}
        sandbox.configure(**{**QUIET, "webhook_max_attempts": 6}, webhook_url=receiver.url,
                          email={"ghost_rate": 0.3, "drop_rate": 0.3})
        run_id = plan(engine, seed(engine, N_LOST, preferred="email"), channels=(Channel.EMAIL,), name="lost-email")
        adapters = build_channels(env, channels=[Channel.EMAIL])
        try:
            ghosts, drops = dispatch_lost_and_ghosted(engine, sandbox, adapters, run_id, "email")
            assert sandbox.drain(10)
            # The ghosts' processed/delivered events reached the receiver and settled them already.
            rows = ledger(engine, run_id)
            assert Counter(r["state"] for r in rows) == {"sent": N_LOST - drops, "unknown": drops}
            # (at least: under load a delivered event can also beat the dispatcher to recording a normal send)
            assert sum("sendgrid" in r["reason"] and r["reason_code"] == "reconciled" for r in rows) >= ghosts

            # A later send whose processed event arrives shows the stream is live after the lost ones.
            sandbox.configure(email={"ghost_rate": 0.0, "drop_rate": 0.0})
            later_run = plan(engine, seed(engine, 2, preferred="email"), channels=(Channel.EMAIL,), name="after")
            Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(later_run)
            assert sandbox.drain(10)

            trusted = SendGridEventRecords(engine, trust_event_stream=True)
            past_grace = later(engine, run_id, trusted.grace + timedelta(minutes=1))
            untrusted = reconcile_unknown(engine, run_id=run_id, grace=timedelta(days=3), now=past_grace,
                                          records=SendGridEventRecords(engine, trust_event_stream=False))
            early = reconcile_unknown(engine, run_id=run_id, records=trusted, grace=timedelta(days=3),
                                      now=later(engine, run_id, timedelta(hours=1)))
            assert untrusted.never_received == early.never_received == 0
            report = reconcile_unknown(engine, run_id=run_id, records=trusted, grace=timedelta(days=3), now=past_grace)
            assert (report.found_sent, report.never_received) == (0, drops)
            assert Counter(r["reason_code"] for r in ledger(engine, run_id))["never_received"] == drops

            again = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
            assert again.outcomes["sent"] == drops
            assert sandbox.drain(10)
        finally:
            close_channels(adapters)
    rows = ledger(engine, run_id)
    assert Counter(r["state"] for r in rows) == {"sent": N_LOST}
    accepted = accepted_per_message(sandbox, "email")
    assert all(accepted[r["message_id"]] == 1 for r in rows)
    assert sandbox.stats()["duplicates_by_message_id_total"] == 0


def test_sendgrid_absence_needs_a_live_stream(engine, sandbox, service_account):
    """Trusted but no processed event ever arrived (webhook not configured): nothing is concluded."""
    env = env_for(sandbox, service_account)
    sandbox.configure(**QUIET, email={"drop_rate": 1.0})
    run_id = plan(engine, seed(engine, 3, preferred="email"), channels=(Channel.EMAIL,), name="no-stream")
    adapters = build_channels(env, channels=[Channel.EMAIL])
    try:
        assert Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id).outcomes["unknown"] == 3
    finally:
        close_channels(adapters)
    report = reconcile_unknown(engine, run_id=run_id, records=SendGridEventRecords(engine, trust_event_stream=True),
                               grace=timedelta(days=3), now=later(engine, run_id, timedelta(days=2)))
    assert (report.found_sent, report.never_received) == (0, 0)
    assert Counter(r["state"] for r in ledger(engine, run_id)) == {"unknown": 3}


def test_sendgrid_trust_setting():
    assert trust_sendgrid_events({"MEMBERCARE_SENDGRID_BASE_URL": "http://127.0.0.1:8025"}) is True
    assert trust_sendgrid_events({}) is False
    assert trust_sendgrid_events({"MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM": "yes"}) is True
    assert trust_sendgrid_events({"MEMBERCARE_SENDGRID_BASE_URL": "http://x",
                                  "MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM": "0"}) is False
    with pytest.raises(ConfigurationError, match="MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM"):
        trust_sendgrid_events({"MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM": "maybe"})


# ---------------------------------------------------------------------------------------------------------------------
# FCM


def test_unknown_push_stays_unknown_without_a_tracking_event(engine, sandbox, service_account):
    env = env_for(sandbox, service_account)
    sandbox.configure(**QUIET, push={"ghost_rate": 0.3, "drop_rate": 0.3})
    run_id = plan(engine, seed(engine, 12, preferred="push"), channels=(Channel.PUSH,), name="lost-push")
    adapters = build_channels(env, channels=[Channel.PUSH])
    records = provider_records_from_env(engine, env)  # Twilio's list and SendGrid's events; nothing for push
    try:
        rep = Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id)
        unknown = rep.outcomes["unknown"]
        assert unknown >= 2
        report = reconcile_unknown(engine, run_id=run_id, records=records, grace=timedelta(hours=1),
                                   now=later(engine, run_id, timedelta(days=3)))
        assert (report.found_sent, report.never_received, report.left_unknown) == (0, 0, unknown)
        assert Dispatcher(engine, adapters, config=FAST, policy=NOPOLICY).dispatch(run_id).attempts == 0
    finally:
        close_channels(adapters)
        records.close()
    rows = ledger(engine, run_id)
    assert Counter(r["reason_code"] for r in rows if r["state"] == "unknown") == {"unknown_not_resent": unknown}
    assert max(accepted_per_message(sandbox, "push").values()) == 1
    assert sandbox.stats()["lookups"] == {}  # no SMS row: Twilio was not asked
