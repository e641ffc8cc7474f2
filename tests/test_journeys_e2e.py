"""Journeys end to end through the provider sandbox with the real SDKs, on a simulated clock.

The shipped abandoned-cart journey: nothing for a member who ordered within the hour, exactly one reminder
(the email) for one who did not, and the push a day later only when the email was not clicked.
"""

from __future__ import annotations

import sqlalchemy as sa

from journey_helpers import (
    OB,
    advance,
    dispatch,
    instance_of,
    members,
    outbox_by_member,
    place_order,
    sandbox_channels,
    send_event,
    settings_for,
    steps_of,
)
from sandbox_fixtures import *  # noqa: F403


def test_abandoned_cart_sends_nothing_after_an_order_and_exactly_one_reminder_otherwise(engine, sandbox, adapters,
                                                                                         clock, tmp_path):
    settings = settings_for(tmp_path)
    ordered, waiting = members(engine, 2, clock(), journey="abandoned_cart", settings=settings)
    t0 = clock()
    for mid in (ordered, waiting):
        send_event(engine, settings, "cart.updated", mid, t0, f"cart-{mid}", items=2)
    assert advance(engine, settings, clock).steps == {}  # both now wait an hour
    clock.advance(minutes=30)
    place_order(engine, ordered, clock(), "O-journey-1")
    clock.advance(minutes=31)
    rep = advance(engine, settings, clock)
    assert rep.exited == {"purchased": 1} and rep.sends == {"planned": 1}
    dispatch(engine, adapters, clock, rep.run_ids)
    assert sandbox_channels(sandbox) == {"email": 1}
    # Advancing again (the same minute, an hour later) adds nothing: the member waits for a click.
    assert advance(engine, settings, clock).sends == {}
    clock.advance(hours=1)
    assert advance(engine, settings, clock).sends == {}
    assert outbox_by_member(engine) == {waiting: [("abandoned_cart_email", "sent", "email")]}
    assert instance_of(engine, "abandoned_cart", ordered).exit_reason == "purchased"
    assert steps_of(engine, instance_of(engine, "abandoned_cart", ordered).id) == []

    clock.advance(hours=23)  # 24 h after the email, no click: the push
    rep = advance(engine, settings, clock)
    dispatch(engine, adapters, clock, rep.run_ids)
    assert sandbox_channels(sandbox) == {"email": 1, "push": 1}
    inst = instance_of(engine, "abandoned_cart", waiting)
    assert inst.status == "completed"
    assert steps_of(engine, inst.id) == [("wait_1h", "waited"), ("email", "planned"), ("wait_click", "timeout"),
                                         ("push", "planned")]
    with engine.connect() as conn:
        keys = conn.execute(sa.select(OB.c.idempotency_key).order_by(OB.c.id)).scalars().all()
    assert keys == [f"abandoned_cart_email|journey:email|{waiting}|@{inst.id}",
                    f"abandoned_cart_push|journey:push|{waiting}|@{inst.id}"]


def test_welcome_series_skips_the_nudge_after_a_purchase(engine, clock, tmp_path):
    settings = settings_for(tmp_path)
    bought, idle = members(engine, 2, clock(), journey="welcome_series", settings=settings)
    for mid in (bought, idle):
        send_event(engine, settings, "member.joined", mid, clock(), f"joined-{mid}")
    from membercare import signals

    with signals.installed(signals.MemorySink()) as sink:
        assert advance(engine, settings, clock).sends == {"planned": 2}  # the welcome, at once
    due, = sink.named(signals.JOURNEY_STEPS_DUE)  # operations see each advance that found due steps
    assert due.payload["claimed"] >= 2 and due.payload["sends"] == 2  # claimed again after moving to a send
    clock.advance(days=1)
    place_order(engine, bought, clock(), "O-welcome-1")
    clock.advance(days=3)  # three days after joining, then the next 10:00 in the member's zone
    rep = advance(engine, settings, clock)
    assert rep.sends == {"planned": 1} and rep.completed == 2
    assert [c for c, _, _ in outbox_by_member(engine)[bought]] == ["welcome_series_hello"]
    assert [c for c, _, _ in outbox_by_member(engine)[idle]] == ["welcome_series_hello", "welcome_series_nudge"]
    assert steps_of(engine, instance_of(engine, "welcome_series", bought).id)[-1] == ("bought", "then")
    from membercare.journeys.funnel import funnel

    with engine.connect() as conn:
        f = funnel(conn, "welcome_series", clock())
    assert f.entered == 2 and f.by_status == {"completed": 2} and f.converted == {"messaged": 1}
    assert f.steps["hello"] == {"planned": 2} and f.steps["bought"] == {"then": 1, "else": 1}
    assert f.rate("messaged") == 0.5 and f.lift is None  # no held-out member among the two


def test_every_shipped_journey_loads_with_its_messages():
    from membercare.config import Settings
    from membercare.journeys.definition import list_journeys

    names = {j.name: j.messages for j in list_journeys(Settings())}
    assert set(names) >= {"welcome_series", "abandoned_cart", "review_recovery", "post_purchase", "points_expiring"}


def test_points_expiring_notice_a_week_before_and_a_last_call_unless_the_member_bought(engine, clock, tmp_path):
    from datetime import UTC, datetime

    settings = settings_for(tmp_path)
    spends, keeps = members(engine, 2, clock(), journey="points_expiring", settings=settings)
    for mid in (spends, keeps):
        send_event(engine, settings, "points.expiring", mid, clock(), f"pts-{mid}", expires_at="2026-12-10",
                   points=1200)
    advance(engine, settings, clock)
    week_before = datetime(2026, 12, 3, 2, tzinfo=UTC)  # 10:00 in Asia/Taipei, 7 days before 12-10
    assert instance_of(engine, "points_expiring", keeps).due_at == week_before
    clock.set(week_before)
    assert advance(engine, settings, clock).sends == {"planned": 2}
    clock.advance(days=2)
    place_order(engine, spends, clock(), "O-points-1")
    clock.set(datetime(2026, 12, 9, 2, tzinfo=UTC))
    assert advance(engine, settings, clock).sends == {"planned": 1}
    assert len(outbox_by_member(engine)[spends]) == 1 and len(outbox_by_member(engine)[keeps]) == 2


def test_review_recovery_stops_when_the_member_answers(engine, clock, tmp_path):
    settings = settings_for(tmp_path)
    answers, silent = members(engine, 2, clock(), consent=(("email", "transactional"), ("sms", "transactional")))
    for mid in (answers, silent):
        send_event(engine, settings, "review.negative", mid, clock(), f"rev-{mid}")
    assert advance(engine, settings, clock).sends == {"planned": 2}  # transactional: no holdout
    clock.advance(days=2)
    send_event(engine, settings, "review.answered", answers, clock(), "ans-1")
    clock.advance(days=5)
    rep = advance(engine, settings, clock)
    assert rep.sends == {"planned": 1} and rep.exited == {"event review.answered": 1}
    assert [c for c, _, _ in outbox_by_member(engine)[silent]] == ["review_recovery_apology", "review_recovery_survey"]


def test_a_click_on_the_cart_email_ends_the_journey_at_once_and_no_push_follows(engine, sandbox, adapters, clock,
                                                                                tmp_path):
    from membercare.engagement.events import EngagementEvent
    from membercare.engagement.store import ingest_events

    settings = settings_for(tmp_path)
    clicks, ignores = members(engine, 2, clock(), journey="abandoned_cart", settings=settings)
    for mid in (clicks, ignores):
        send_event(engine, settings, "cart.updated", mid, clock(), f"cart-{mid}")
    clock.advance(hours=1)
    rep = advance(engine, settings, clock)
    dispatch(engine, adapters, clock, rep.run_ids)
    with engine.connect() as conn:
        message_id = conn.execute(sa.select(OB.c.message_id).where(OB.c.member_id == clicks)).scalar_one()
    clock.advance(minutes=20)
    ingest_events(engine, [EngagementEvent(provider="sendgrid", dedupe_key=f"click-{message_id}", kind="clicked",
                                           channel="email", occurred_at=clock(), message_id=message_id,
                                           member_id=clicks)])
    rep = advance(engine, settings, clock)  # woken by the click, not 24 h later
    assert rep.woken == 1 and rep.completed == 1 and rep.steps == {"wait_for:event": 1}
    clock.advance(hours=24)
    rep = advance(engine, settings, clock)
    dispatch(engine, adapters, clock, rep.run_ids)
    assert [c for c, _, _ in outbox_by_member(engine)[clicks]] == ["abandoned_cart_email"]
    assert [c for c, _, _ in outbox_by_member(engine)[ignores]] == ["abandoned_cart_email", "abandoned_cart_push"]
    assert sandbox_channels(sandbox) == {"email": 2, "push": 1}
