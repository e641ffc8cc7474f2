"""The Prefect-free campaign stages (membercare/campaigns/), on SQLite and PostgreSQL.

A generated shop of a few hundred members at a fixed ``as_of`` (10:00 in Taipei, outside quiet hours);
providers are in-process fakes (the sandbox and the SDKs are covered by the flow and demo tests).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from fakes import FakeAdapter
from membercare.campaigns.audience import resolve_audience
from membercare.campaigns.dispatch import dispatch_round
from membercare.campaigns.dry_run import dry_run
from membercare.campaigns.occurrence import RunOptions, occurrence_key, prepare
from membercare.campaigns.offers import coupon_code
from membercare.campaigns.run import run_campaign
from membercare.campaigns.triggers import plan_trigger
from membercare.config import Settings
from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.engagement.models import EngagementEventRow
from membercare.engagement.sync import sync_engagement
from membercare.errors import InputError
from membercare.models import Coupon, Member
from membercare.optimise import assignment

AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 Asia/Taipei
OB, R, C = OutboxMessage.__table__, CampaignRun.__table__, Coupon.__table__


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=400, seed=11, as_of=AS_OF - timedelta(hours=10))
    return engine


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def fakes() -> dict[str, FakeAdapter]:
    return {c: FakeAdapter(c) for c in ("email", "sms", "push")}


def counts(engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in (OB, R, C))


# -------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("granularity, expected", [
    ("hourly", "2026-11-23T10"), ("daily", "2026-11-23"), ("weekly", "2026-W48"), ("monthly", "2026-11"),
    ("once", "once")])
def test_occurrence_keys_use_the_shop_timezone(granularity, expected):
    assert occurrence_key(granularity, AS_OF, "Asia/Taipei") == expected
    # 23:30 UTC on the 22nd is already the 23rd in Taipei.
    late = datetime(2026, 11, 22, 23, 30, tzinfo=UTC)
    assert occurrence_key("daily", late, "Asia/Taipei") == "2026-11-23"
    assert occurrence_key("daily", late, "UTC") == "2026-11-22"
    assert occurrence_key("daily", AS_OF, "Asia/Taipei", tag="d3") == "2026-11-23:d3"


def test_coupon_codes_are_deterministic_and_distinct():
    a = coupon_code("birthday", "2026-11-23", 42)
    assert a == coupon_code("birthday", "2026-11-23", 42)
    assert a.startswith("BIRTHDAY-") and len(a) <= 64
    assert len({coupon_code("birthday", "2026-11-23", m) for m in range(2000)}) == 2000
    assert a != coupon_code("birthday", "2026-11-24", 42)


def test_options_are_validated(settings):
    with pytest.raises(InputError):
        RunOptions(limit=-1)
    with pytest.raises(InputError):
        RunOptions(occurrence_tag="has space")
    with pytest.raises(InputError, match="does not use"):
        prepare(settings, "recommendations", RunOptions(channels=("sms",)), check=False)
    with pytest.raises(InputError, match="transactional"):
        prepare(settings, "service_recovery", RunOptions(holdout_rate=0.1), check=False)


def test_campaign_segment_params_reach_the_segment(settings):
    p = prepare(settings, "coupon_expiry", RunOptions(as_of=AS_OF), check=False)
    assert p.segment_params == {"days": 3} and p.holdout_rate == assignment.DEFAULT_HOLDOUT_RATE
    p = prepare(settings, "welcome_day7", RunOptions(as_of=AS_OF), check=False)
    assert p.segment_params == {"day": 7} and p.occurrence == "once"
    p = prepare(settings, "coupon_expiry",
                RunOptions(as_of=AS_OF, segment_params={"days": 1}, occurrence_tag="d1"), check=False)
    assert p.segment_params == {"days": 1} and p.occurrence == "once:d1"
    assert prepare(settings, "service_recovery", RunOptions(as_of=AS_OF), check=False).holdout_rate == 0


def test_every_campaigns_segment_parameters_are_valid_for_its_segment(settings):
    from membercare.campaigns import list_campaigns
    from segments.base import ref

    scheduled = [c for c in list_campaigns(settings) if c.segment is not None]
    assert scheduled
    for c in scheduled:
        ref(c.segment.name, **c.segment.params)  # an unknown segment or parameter raises


# ----------------------------------------------------------------------------------------- with a database


def test_dry_run_writes_nothing_and_reports_what_would_go_out(shop, settings):
    before = counts(shop)
    p = prepare(settings, "birthday", RunOptions(as_of=AS_OF, holdout_rate=0.3))
    # Birthdays of today are few in a small shop: widen the segment to the next month for a useful sample.
    p = prepare(settings, "birthday", RunOptions(as_of=AS_OF, holdout_rate=0.3,
                                                 segment_params={"days_ahead": 31}))
    audience = resolve_audience(shop, p)
    assert audience.size == len(audience) > 5
    rep = dry_run(shop, p, audience)
    assert counts(shop) == before, "a dry run must not write outbox rows, runs or coupons"
    assert sum(rep.by_state.values()) == len(audience)
    assert sum(rep.would_send.values()) > 0 and rep.samples
    assert rep.by_reason.get("holdout", 0) > 0
    # Offer coupons would be issued to everyone not held out, and are not (rolled back).
    assert rep.coupons_to_issue == len(audience) - rep.by_reason.get("holdout", 0)
    assert all(s.channel in ("email", "sms", "push") and s.headline for s in rep.samples)


def test_rerun_sends_nothing_twice_and_records_holdouts(shop, settings):
    adapters = fakes()
    opts = RunOptions(as_of=AS_OF, segment_params={"days_ahead": 31}, holdout_rate=0.25)
    first = run_campaign(shop, settings, "birthday", opts, adapters=adapters)
    s = first.summary
    assert s.newly_planned == s.planned == s.segment_size > 5
    sent_first = sum(a.calls for a in adapters.values())
    assert sent_first == s.sent_total + sum(s.failed.values()) > 0
    assert s.sent_now == s.sent_total

    # The holdout: recorded as skipped rows with reason holdout, exactly the members assignment picks,
    # and those members were not issued the birthday coupon.
    with shop.connect() as conn:
        rows = conn.execute(sa.select(OB.c.member_id, OB.c.state, OB.c.reason_code, OB.c.variant)
                            .where(OB.c.run_id == s.run_id)).all()
        coupon_members = set(conn.execute(sa.select(C.c.member_id).where(C.c.campaign == "birthday")).scalars())
    held = {r.member_id for r in rows if r.reason_code == "holdout"}
    assert held == {r.member_id for r in rows if assignment.in_holdout(r.member_id, "birthday", 0.25)}
    assert held and all(r.state == "skipped" and r.variant == "holdout" for r in rows if r.member_id in held)
    assert not held & coupon_members
    assert coupon_members == {r.member_id for r in rows} - held

    again = run_campaign(shop, settings, "birthday", opts, adapters=adapters)
    assert again.summary.newly_planned == 0 and again.summary.sent_now == 0
    assert sum(a.calls for a in adapters.values()) == sent_first, "a rerun must not call a provider again"
    assert again.summary.sent == s.sent
    with shop.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(C).where(C.c.campaign == "birthday")
                            ).scalar_one() == len(coupon_members)


def test_per_coupon_campaign_keys_on_the_coupon(shop, settings):
    res = run_campaign(shop, settings, "coupon_expiry",
                       RunOptions(as_of=AS_OF, segment_params={"days": 14}, limit=20), adapters=fakes())
    assert res.summary.newly_planned == 20 and res.summary.segment_size >= 20
    with shop.connect() as conn:
        keys = conn.execute(sa.select(OB.c.idempotency_key, OB.c.coupon_code)
                            .where(OB.c.run_id == res.summary.run_id)).all()
        open_codes = set(conn.execute(sa.select(C.c.code).where(C.c.redeemed_at.is_(None))).scalars())
    assert all(k.coupon_code in open_codes and k.idempotency_key.endswith("|" + k.coupon_code) for k in keys)
    assert all(k.idempotency_key.startswith("coupon_expiry|once|") for k in keys)


def test_planning_without_adapters_leaves_rows_for_a_dispatcher(shop, settings):
    res = run_campaign(shop, settings, "welcome_day3", RunOptions(as_of=AS_OF))
    s = res.summary
    assert s.sent_total == 0 and s.waiting + sum(s.skipped.values()) + s.deferred + sum(s.suppressed.values()) \
        == s.planned == s.segment_size
    out = dispatch_round(shop, s.run_id, fakes())
    assert out.outcomes.get("sent", 0) == s.waiting


def test_explicit_member_audience_and_trigger_planning(shop, settings):
    with shop.connect() as conn:
        ext, mid = conn.execute(sa.select(Member.__table__.c.external_id, Member.__table__.c.id).limit(1)).one()
    plans = plan_trigger(shop, settings, "review.negative", ext, ref="R-1", at=AS_OF)
    assert [p.campaign for p in plans] == ["service_recovery"] and plans[0].member_id == mid
    res = run_campaign(shop, settings, plans[0].campaign, plans[0].options, adapters=fakes())
    assert res.summary.occurrence == "event-R-1" and res.summary.planned == 1
    again = run_campaign(shop, settings, plans[0].campaign, plans[0].options, adapters=fakes())
    assert again.summary.newly_planned == 0
    with pytest.raises(InputError):
        plan_trigger(shop, settings, "no.such.event", ext)
    with pytest.raises(InputError):
        plan_trigger(shop, settings, "order.delivered", ext)  # needs --order


def test_sync_engagement_settles_unknown_rows_from_events(shop, settings):
    res = run_campaign(shop, settings, "welcome_day7", RunOptions(as_of=AS_OF), adapters=fakes())
    with shop.begin() as conn:
        row = conn.execute(sa.select(OB.c.id, OB.c.message_id, OB.c.channel).where(
            OB.c.run_id == res.summary.run_id, OB.c.state == "sent").limit(1)).one()
        conn.execute(sa.update(OB).where(OB.c.id == row.id).values(state="unknown", reason_code="in_flight_at_crash"))
        conn.execute(sa.insert(EngagementEventRow.__table__).values(
            provider="sendgrid", provider_event_id="e1", kind="delivered", channel=row.channel,
            message_id=row.message_id, occurred_at=AS_OF, received_at=AS_OF, raw="{}"))
    rep = sync_engagement(shop, now=AS_OF + timedelta(minutes=1))
    assert rep.settled_from_events == 1 and rep.runs_refreshed >= 1
    with shop.connect() as conn:
        assert conn.execute(sa.select(OB.c.state).where(OB.c.id == row.id)).scalar_one() == "sent"


# ------------------------------------------------------------------------------------ POST /triggers/{event}


def test_trigger_endpoint_authenticates_validates_and_starts_a_run(shop, settings):
    import json

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from channels.fcm.webhooks import SIGNATURE_HEADER, sign_push_tracking
    from membercare.receiver.triggers import TriggerConfig, build_trigger_router

    started = []
    app = FastAPI()
    app.include_router(build_trigger_router(shop, TriggerConfig(secret="trigger-secret"), settings,
                                            starter=lambda params: started.append(params) or "run-1"))
    client = TestClient(app)
    with shop.connect() as conn:
        ext = conn.execute(sa.select(Member.__table__.c.external_id).limit(1)).scalar()

    def post(event, payload, secret="trigger-secret", sign=True):
        body = json.dumps(payload).encode()
        headers = {SIGNATURE_HEADER: sign_push_tracking(secret, body)} if sign else {}
        return client.post(f"/triggers/{event}", content=body, headers=headers)

    assert post("review.negative", {"member": ext}, sign=False).status_code == 401
    assert post("review.negative", {"member": ext}, secret="forged").status_code == 403
    assert post("review.negative", {"nobody": 1}).status_code == 400
    assert post("no.such.event", {"member": ext}).status_code == 404
    assert post("review.negative", {"member": "M-NOPE"}).status_code == 422
    assert not started, "nothing may start before the request is authenticated and valid"
    ok = post("review.negative", {"member": ext, "ref": "R7"})
    assert ok.status_code == 202 and ok.json()["flow_run_id"] == "run-1"
    assert started == [{"event": "review.negative", "member": ext, "ref": "R7"}]

    closed = FastAPI()
    closed.include_router(build_trigger_router(shop, TriggerConfig(secret=None), settings, starter=lambda p: "x"))
    assert TestClient(closed).post("/triggers/review.negative", content=b"{}").status_code == 503
