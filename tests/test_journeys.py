"""Journeys: every step type end to end through the provider sandbox on a simulated clock, entry (re-entry
policy, holdout), exits, and definitions that fail with the file and line."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from journey_helpers import (
    JI,
    advance,
    dispatch,
    instance_of,
    make_journey,
    members,
    outbox_by_member,
    sandbox_channels,
    send_event,
    steps_of,
)
from membercare.errors import UnknownNameError
from membercare.journeys.definition import JourneyDefinitionError, load_journey
from membercare.models import Member
from sandbox_fixtures import *  # noqa: F403

EVERY_STEP = """\
description: Every step type once.
entry: {event: test.start}
exit: {events: [test.stop]}
steps:
  - {id: w_dur, wait: {duration: 2h}}
  - {id: w_tod, wait: {until_time: "09:30"}}
  - {id: w_date, wait: {until_date: context.due, offset_days: -1, at: "10:00"}}
  - {id: hello, send: {message: care_test_email}}
  - {id: wf, wait_for: {event: review.answered, timeout: 2d, then: tier, else: nudge}}
  - {id: nudge, send: {message: care_test_push}, next: end}
  - id: tier
    branch: {if: {attribute: tier, equals: gold}, then: gold, else: region}
  - id: region
    branch: {if: {segment: region, params: {region: north}}, then: gold, else: end}
  - {id: gold, send: {message: care_test_push}}
"""
MESSAGES = {"care_test_email": "abandoned_cart_email", "care_test_push": "abandoned_cart_push"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_every_step_type_end_to_end_through_the_sandbox(engine, sandbox, adapters, clock, tmp_path):
    settings = make_journey(tmp_path, "care_test", EVERY_STEP, MESSAGES)
    gold, answers, silent, stops = members(engine, 4, clock())
    with engine.begin() as conn:
        m = Member.__table__
        conn.execute(sa.update(m).where(m.c.id == gold).values(tier="gold"))
        conn.execute(sa.update(m).where(m.c.id == answers).values(region="north"))
    t0 = clock()  # 2026-11-23 12:00 in Asia/Taipei
    for mid in (gold, answers, silent, stops):
        send_event(engine, settings, "test.start", mid, t0, f"start-{mid}", due="2026-11-26")
    advance(engine, settings, clock)
    assert instance_of(engine, "care_test", gold).due_at == at("2026-11-23T14:00:00+08:00")

    clock.set(at("2026-11-23T14:00:00+08:00"))
    advance(engine, settings, clock)
    # Until 09:30 in the member's zone: the next morning.
    assert instance_of(engine, "care_test", gold).due_at == at("2026-11-24T09:30:00+08:00")
    send_event(engine, settings, "test.stop", stops, clock(), "stop-1")

    clock.set(at("2026-11-24T09:30:00+08:00"))
    rep = advance(engine, settings, clock)
    assert rep.exited == {"event test.stop": 1}
    # Until the day before context.due at 10:00.
    assert instance_of(engine, "care_test", gold).due_at == at("2026-11-25T10:00:00+08:00")

    clock.set(at("2026-11-25T10:00:00+08:00"))
    rep = advance(engine, settings, clock)
    assert rep.sends == {"planned": 3}
    dispatch(engine, adapters, clock, rep.run_ids)
    assert sandbox_channels(sandbox) == {"email": 3}
    assert instance_of(engine, "care_test", gold).waiting_for == "review.answered"

    clock.set(at("2026-11-25T13:00:00+08:00"))
    for mid in (gold, answers):
        send_event(engine, settings, "review.answered", mid, clock(), f"answer-{mid}")
    rep = advance(engine, settings, clock)  # woken by the events: no need to wait for the timeout
    assert rep.sends == {"planned": 2}
    dispatch(engine, adapters, clock, rep.run_ids)

    clock.set(at("2026-11-27T10:00:00+08:00"))  # two days after the email: the silent member's timeout
    rep = advance(engine, settings, clock)
    assert rep.sends == {"planned": 1}
    dispatch(engine, adapters, clock, rep.run_ids)
    assert sandbox_channels(sandbox) == {"email": 3, "push": 3}
    assert advance(engine, settings, clock).claimed == 0

    assert steps_of(engine, instance_of(engine, "care_test", gold).id) == [
        ("w_dur", "waited"), ("w_tod", "waited"), ("w_date", "waited"), ("hello", "planned"), ("wf", "event"),
        ("tier", "then"), ("gold", "planned")]
    assert steps_of(engine, instance_of(engine, "care_test", answers).id)[-3:] == [
        ("tier", "else"), ("region", "then"), ("gold", "planned")]
    assert steps_of(engine, instance_of(engine, "care_test", silent).id)[-2:] == [("wf", "timeout"),
                                                                                ("nudge", "planned")]
    assert steps_of(engine, instance_of(engine, "care_test", stops).id) == [("w_dur", "waited")]
    sent = outbox_by_member(engine)
    assert stops not in sent
    assert {mid: [c for c, _, _ in rows] for mid, rows in sent.items()} == {
        gold: ["care_test_email", "care_test_push"], answers: ["care_test_email", "care_test_push"],
        silent: ["care_test_email", "care_test_push"]}
    assert all(state == "sent" for rows in sent.values() for _, state, _ in rows)


REENTRY = """\
description: Re-entry and holdout.
entry: {event: test.start}
reentry: %s
holdout: 0.3
steps:
  - {id: w, wait: {duration: 1h}}
"""


@pytest.mark.parametrize("policy", ["never", "after_exit"])
def test_reentry_policy_and_holdout_at_entry(engine, clock, tmp_path, policy):
    settings = make_journey(tmp_path, "reentry_test", REENTRY % policy, {})
    ids = members(engine, 40, clock())
    for mid in ids:
        send_event(engine, settings, "test.start", mid, clock(), f"a-{mid}")
        send_event(engine, settings, "test.start", mid, clock(), f"a-{mid}")  # the same event again: stored once
        send_event(engine, settings, "test.start", mid, clock(), f"b-{mid}")  # while active: not again
    with engine.connect() as conn:
        rows = conn.execute(sa.select(JI.c.member_id, JI.c.status)).all()
    held = {r.member_id for r in rows if r.status == "holdout"}
    active = [r.member_id for r in rows if r.status == "active"]
    assert sorted(active) == sorted(set(ids) - held) and 3 <= len(held) <= 25
    clock.advance(hours=1)
    rep = advance(engine, settings, clock)
    assert rep.completed == len(active) and rep.claimed == len(active)  # held-out instances never advance
    for mid in active:
        send_event(engine, settings, "test.start", mid, clock(), f"c-{mid}")
    with engine.connect() as conn:
        again = conn.execute(sa.select(sa.func.count()).select_from(JI).where(JI.c.status == "active")).scalar()
    assert again == (len(active) if policy == "after_exit" else 0)


def test_definition_errors_name_the_file_and_line(tmp_path):
    bad = EVERY_STEP.replace("timeout: 2d", "timeout: soon").replace("then: gold, else: end", "then: w_dur")
    settings = make_journey(tmp_path, "care_test", bad, MESSAGES)
    path = settings.templates_dir / "care_test" / "journey.yaml"
    with pytest.raises(JourneyDefinitionError) as exc:
        load_journey("care_test", settings)
    text = str(exc.value)
    assert f"{path}:9: steps.4.wait_for.timeout" in text
    assert f"{path}:14: steps.7.branch.else: Field required" in text
    path.write_text(EVERY_STEP.replace("then: tier, else: nudge", "then: w_dur, else: nudge"), encoding="utf-8")
    with pytest.raises(JourneyDefinitionError, match="jumps go forward only"):
        load_journey("care_test", settings)
    path.write_text(EVERY_STEP.replace("care_test_push}, next", "nope}, next"), encoding="utf-8")
    with pytest.raises(JourneyDefinitionError, match="steps.5.send.message: no campaign folder 'nope'"):
        load_journey("care_test", settings)
    with pytest.raises(UnknownNameError):
        load_journey("missing", settings)


SEGMENT_JOURNEY = """\
description: Segment entry, a birthday wait, leaving the segment.
entry: {segment: {name: region, params: {region: north}}}
reentry: never
exit: {left_segment: {name: region, params: {region: north}}}
steps:
  - {id: bday, wait: {until_date: birthday, offset_days: -3, at: "09:00"}}
  - {id: w, wait: {duration: 1d}}
"""


def test_segment_entry_a_birthday_wait_and_leaving_the_segment(engine, clock, tmp_path):
    from datetime import date

    from membercare.journeys.entry import enter_from_segment

    settings = make_journey(tmp_path, "seg_test", SEGMENT_JOURNEY, {})
    stays, leaves, outside = members(engine, 3, clock())
    m = Member.__table__
    with engine.begin() as conn:
        conn.execute(sa.update(m).where(m.c.id.in_([stays, leaves])).values(region="north", birthday=date(1990, 1, 2)))
        journey = load_journey("seg_test", settings)
        assert enter_from_segment(conn, journey, clock(), settings.shop_timezone) == 2
        assert enter_from_segment(conn, journey, clock(), settings.shop_timezone) == 0  # never: once
    advance(engine, settings, clock)
    # Three days before the next birthday (2027-01-02), at 09:00 in Asia/Taipei.
    assert instance_of(engine, "seg_test", stays).due_at == at("2026-12-30T09:00:00+08:00")
    assert instance_of(engine, "seg_test", outside) is None
    with engine.begin() as conn:
        conn.execute(sa.update(m).where(m.c.id == leaves).values(region="south"))
    clock.set(at("2026-12-30T09:00:00+08:00"))
    rep = advance(engine, settings, clock)
    assert rep.exited == {"left segment region": 1} and rep.steps == {"wait:waited": 1}


def test_a_journeys_messages_cannot_be_triggered_on_their_own(tmp_path):
    from membercare.campaigns.triggers import trigger_events
    from membercare.config import Settings

    events = trigger_events(Settings())
    assert not [e for e in events if e.startswith("journey.")]
    assert "abandoned_cart_email" not in [c for names in events.values() for c in names]


def test_a_journey_that_sends_a_transactional_message_cannot_hold_members_out(tmp_path):
    text = "description: x\nentry: {event: a.b}\nholdout: 0.1\nsteps:\n  - {id: s, send: {message: t_apology}}\n"
    settings = make_journey(tmp_path, "t_test", text, {"t_apology": "review_recovery_apology"})
    with pytest.raises(JourneyDefinitionError, match="t_apology is transactional"):
        load_journey("t_test", settings)
