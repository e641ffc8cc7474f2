"""Planning writes the outbox ledger: idempotent per occurrence, a reason for everyone, caps across campaigns."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from clock import FROZEN_NOW
from fakes import seed_members, simple_renderer
from membercare.consent import ConsentStatement, record_consents
from membercare.delivery.contract import EmailContent, SmsContent
from membercare.delivery.models import CampaignRun, OutboxMessage, decode_contents
from membercare.delivery.planner import HOLDOUT, PlanSpec, Recipient, idempotency_key, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.errors import InputError
from membercare.models import Channel, Purpose

NOON_TPE = FROZEN_NOW  # 12:00 in Taipei: outside quiet hours; members are seeded at the same instant
OB = OutboxMessage.__table__


def spec(name="welcome", occ="2026-11-23", purpose=Purpose.MARKETING, channels=("email", "sms", "push"), priority=0):
    return PlanSpec(name, occ, purpose, tuple(Channel(c) for c in channels), priority=priority)


def rows(engine, **where):
    with engine.connect() as conn:
        q = sa.select(OB).order_by(OB.c.id)
        for k, v in where.items():
            q = q.where(OB.c[k] == v)
        return [dict(r) for r in conn.execute(q).mappings()]


def test_planning_twice_adds_nothing(engine):
    with engine.begin() as conn:
        ids = seed_members(conn, 25, now=NOON_TPE)
    batches = [ids[:10], ids[10:]]
    first = plan_run(engine, spec(), batches, NOON_TPE, simple_renderer)
    snapshot = rows(engine)
    again = plan_run(engine, spec(), batches, NOON_TPE, simple_renderer)
    assert first.inserted == 25 and again.inserted == 0 and again.already_planned == 25
    assert rows(engine) == snapshot  # same rows, same message ids, same content
    assert {r["idempotency_key"] for r in snapshot} == {idempotency_key("welcome", "2026-11-23", m) for m in ids}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(CampaignRun.__table__)).scalar() == 1
    # A new occurrence is a new run with its own rows.
    plan_run(engine, spec(occ="2026-11-24"), [ids], NOON_TPE + timedelta(days=1), simple_renderer,
             policy=PolicySettings(marketing_cap=None))
    assert len(rows(engine)) == 50


def test_rows_carry_route_and_content_of_every_chain_channel(engine):
    with engine.begin() as conn:
        (mid,) = seed_members(conn, 1, preferred="sms,email,push", now=NOON_TPE)
    plan_run(engine, spec(), [[mid]], NOON_TPE, simple_renderer)
    (row,) = rows(engine)
    assert row["state"] == "planned" and row["channel"] == "sms" and row["fallback_channels"] == "email,push"
    assert row["reason"].startswith("via sms (preference #1, marketing consent, reachable)")
    contents = decode_contents(row["content"])
    assert isinstance(contents["sms"], SmsContent) and isinstance(contents["email"], EmailContent)
    assert set(contents) == {"sms", "email", "push"}
    assert len(row["message_id"]) == 32 and "@" not in row["reason"]  # no address in the ledger


def test_everyone_gets_a_row_with_a_reason(engine):
    now = NOON_TPE
    with engine.begin() as conn:
        # Consent is granted the day before `now` and revoked at `now`: the revocation is the latest word.
        ok, no_consent, held = seed_members(conn, 3, push=False, now=now)
        record_consents(conn, [ConsentStatement(no_consent, ch, "marketing", False, "preference_center", now)
                               for ch in ("email", "sms", "push")])
    plan_run(engine, spec(), [[ok, no_consent, held]], now, simple_renderer,
             assign=lambda ctx, rc: HOLDOUT if rc.member_id == held else "A")
    by_member = {r["member_id"]: r for r in rows(engine)}
    assert by_member[ok]["state"] == "planned" and by_member[ok]["variant"] == "A"
    assert by_member[no_consent]["state"] == "skipped" and by_member[no_consent]["reason_code"] == "no_consent"
    assert by_member[held]["state"] == "skipped" and by_member[held]["reason_code"] == "holdout"
    assert by_member[held]["content"] is None


def test_quiet_hours_defer_sms_at_planning(engine):
    late = datetime(2026, 11, 23, 14, tzinfo=UTC)  # 22:00 in Taipei
    with engine.begin() as conn:
        (mid,) = seed_members(conn, 1, preferred="sms,email", now=NOON_TPE)
    plan_run(engine, spec(), [[mid]], late, simple_renderer)
    (row,) = rows(engine)
    assert row["state"] == "deferred" and row["reason_code"] == "quiet_hours"
    assert row["next_attempt_at"] == datetime(2026, 11, 24, 1, tzinfo=UTC)  # 09:00 Taipei


def test_frequency_cap_and_priority_preemption_across_campaigns(engine):
    policy = PolicySettings(marketing_cap=2)
    with engine.begin() as conn:
        ids = seed_members(conn, 3, now=NOON_TPE)
    plan_run(engine, spec("low-a", priority=1), [ids], NOON_TPE, simple_renderer, policy=policy)
    plan_run(engine, spec("low-b", priority=1), [ids], NOON_TPE, simple_renderer, policy=policy)
    # Equal priority, cap reached: skipped with the reason.
    plan_run(engine, spec("same", priority=1), [ids], NOON_TPE, simple_renderer, policy=policy)
    assert {r["reason_code"] for r in rows(engine, campaign="same")} == {"frequency_cap"}
    # Higher priority takes a slot from one unsent lower-priority message per member.
    rep = plan_run(engine, spec("vip", priority=9), [ids], NOON_TPE, simple_renderer, policy=policy)
    assert rep.preempted == 3
    assert all(r["state"] == "planned" for r in rows(engine, campaign="vip"))
    preempted = [r for r in rows(engine) if r["reason_code"] == "preempted"]
    assert len(preempted) == 3 and all("vip" in r["reason"] for r in preempted)
    # Sent messages are never preempted: mark everything active as sent; another VIP campaign is capped.
    with engine.begin() as conn:
        conn.execute(sa.update(OB).where(OB.c.state == "planned").values(state="sent"))
    plan_run(engine, spec("vip2", priority=99), [ids], NOON_TPE, simple_renderer, policy=policy)
    assert {r["reason_code"] for r in rows(engine, campaign="vip2")} == {"frequency_cap"}
    # Transactional messages bypass marketing caps (but still need transactional consent).
    with engine.begin() as conn:
        record_consents(conn, [ConsentStatement(m, "email", "transactional", True, "import", NOON_TPE)
                               for m in ids])
    plan_run(engine, spec("order-shipped", purpose=Purpose.TRANSACTIONAL, channels=("email",)), [ids], NOON_TPE,
             simple_renderer, policy=policy)
    assert {r["state"] for r in rows(engine, campaign="order-shipped")} == {"planned"}


def test_coupon_joins_the_idempotency_key(engine):
    with engine.begin() as conn:
        (mid,) = seed_members(conn, 1, now=NOON_TPE)
    rcpts = [Recipient(mid, coupon_code="C1"), Recipient(mid, coupon_code="C2"), Recipient(mid, coupon_code="C1")]
    rep = plan_run(engine, spec(), [rcpts], NOON_TPE, simple_renderer, policy=PolicySettings(marketing_cap=None))
    assert rep.inserted == 2
    assert sorted(r["idempotency_key"] for r in rows(engine)) == [f"welcome|2026-11-23|{mid}|C1",
                                                                  f"welcome|2026-11-23|{mid}|C2"]


def test_render_error_rolls_back_the_batch(engine):
    with engine.begin() as conn:
        ids = seed_members(conn, 4, now=NOON_TPE)

    def broken(req):
        raise RuntimeError("template error")

    with pytest.raises(RuntimeError):
        plan_run(engine, spec(), [ids], NOON_TPE, broken)
    assert rows(engine) == []
    assert plan_run(engine, spec(), [ids], NOON_TPE, simple_renderer).inserted == 4


def test_unknown_member_and_bad_names_are_input_errors(engine):
    with pytest.raises(InputError):
        plan_run(engine, spec(), [[12345]], NOON_TPE, simple_renderer)
    with pytest.raises(InputError):
        spec(name="a|b")


def test_prefer_hook_reorders_channels_but_routing_still_checks_consent(engine):
    with engine.begin() as conn:
        a, b = seed_members(conn, 2, preferred="email,sms,push",
                            consent=(("email", "marketing"), ("push", "marketing")), now=NOON_TPE)
    # A strategy asks for SMS first; member a has no SMS consent, so routing falls to the next allowed one.
    prefer = {a: ["sms", "push", "email"], b: None}
    plan_run(engine, spec(), [[a, b]], NOON_TPE, simple_renderer, prefer=lambda ctx, rc: prefer[rc.member_id])
    got = {r["member_id"]: (r["channel"], r["fallback_channels"]) for r in rows(engine)}
    assert got[a] == ("push", "email")
    assert got[b] == ("email", "push")  # None keeps the member's stated preference


def test_deliver_at_hook_defers_to_the_chosen_instant_and_respects_quiet_hours(engine):
    with engine.begin() as conn:
        a, b, c = seed_members(conn, 3, preferred="sms,email", now=NOON_TPE)
    at = {a: NOON_TPE + timedelta(hours=5),  # 17:00 Taipei
          b: NOON_TPE + timedelta(hours=11),  # 23:00 Taipei: inside SMS quiet hours -> their end
          c: NOON_TPE - timedelta(hours=1)}  # in the past: send now
    plan_run(engine, spec(), [[a, b, c]], NOON_TPE, simple_renderer, deliver_at=lambda ctx, rc, ch: at[rc.member_id])
    got = {r["member_id"]: r for r in rows(engine)}
    assert (got[a]["state"], got[a]["reason_code"], got[a]["next_attempt_at"]) == ("deferred", "send_time", at[a])
    assert got[b]["reason_code"] == "quiet_hours"
    assert got[b]["next_attempt_at"] == datetime(2026, 11, 24, 1, tzinfo=UTC)
    assert (got[c]["state"], got[c]["reason_code"], got[c]["next_attempt_at"]) == ("planned", "routed", None)


def test_global_control_members_get_a_skipped_row_with_their_own_reason(engine):
    from membercare.delivery.planner import GLOBAL_CONTROL

    with engine.begin() as conn:
        a, b = seed_members(conn, 2, now=NOON_TPE)
    plan_run(engine, spec(), [[a, b]], NOON_TPE, simple_renderer,
             assign=lambda ctx, rc: GLOBAL_CONTROL if rc.member_id == a else None)
    got = {r["member_id"]: r for r in rows(engine)}
    assert (got[a]["state"], got[a]["reason_code"], got[a]["variant"], got[a]["content"]) == (
        "skipped", "global_control", "global_control", None)
    assert got[b]["state"] == "planned"
