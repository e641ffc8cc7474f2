"""The report's journey section on a small constructed dataset: entered, each step reached and sent, converted
within the window after entry, exited by reason, and the holdout lift with its member-clustered interval (a
member who re-enters is one cluster of two instances). The numbers are worked out by hand below."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from rich.console import Console

from journey_helpers import OB, advance, make_journey, members, place_order, send_event
from membercare.journeys.definition import load_journey
from membercare.journeys.entry import holdout_domain
from membercare.optimise.assignment import in_holdout
from membercare.reports import ReportOptions, build_report
from membercare.reports.html import render_html
from membercare.reports.journeys import lift_text, print_journeys
from membercare.reports.stats import ClusterSums, clustered_lift

JOURNEY = """
description: test cart journey with a large holdout
entry: {event: cart.updated}
reentry: after_exit
holdout: 0.4
exit: {purchased: true}
steps:
  - {id: wait_1h, wait: {duration: 1h}}
  - {id: email, send: {message: cart_test_email}}
  - {id: wait_click, wait_for: {event: clicked, timeout: 24h, then: end}}
  - {id: push, send: {message: cart_test_push}}
"""


def _mark_sent(engine, step: str, member_ids: list[int]) -> None:
    """As a dispatcher would have recorded them: these members' messages of ``step`` were sent."""
    with engine.begin() as conn:
        conn.execute(sa.update(OB).where(OB.c.occurrence == f"journey:{step}", OB.c.member_id.in_(member_ids))
                     .values(state="sent"))


def test_report_journey_section_counts_and_clustered_holdout_lift(engine, clock, tmp_path):
    settings = make_journey(tmp_path, "cart_test", JOURNEY,
                            {"cart_test_email": "abandoned_cart_email", "cart_test_push": "abandoned_cart_push"})
    j = load_journey("cart_test", settings)
    t0 = clock()
    pool = members(engine, 40, t0)
    held = [m for m in pool if in_holdout(m, holdout_domain(j), j.holdout)]
    messaged = [m for m in pool if m not in held]
    m1, m2, m3, m4, m5, m6 = messaged[:6]
    h1, h2, h3, h4 = held[:4]
    for mid in (m1, m2, m3, m4, m5, m6, h1, h2, h3, h4):
        send_event(engine, settings, "cart.updated", mid, t0, f"cart-{mid}")
    advance(engine, settings, clock)  # everyone waits an hour

    clock.advance(minutes=30)
    # m1 buys before the email, told by the shop as an order.placed event (no order row): exits, and converts
    # as the journey's exits see a purchase.
    send_event(engine, settings, "order.placed", m1, clock(), f"order-{m1}")
    clock.advance(minutes=31)
    advance(engine, settings, clock)  # m2..m6: the email
    _mark_sent(engine, "email", [m2, m3, m4])
    place_order(engine, m2, t0 + timedelta(hours=2), "O-2")  # m2 buys after the email: converted
    place_order(engine, h1, t0 + timedelta(hours=3), "O-3")  # a held-out member buys: holdout converted
    place_order(engine, m5, t0 + timedelta(days=10), "O-5")  # outside the 7-day window: not converted

    clock.advance(hours=24)
    advance(engine, settings, clock)  # m2 exits (purchased); m3..m6: no click in 24 h, the push
    _mark_sent(engine, "push", [m3, m4])

    clock.set(t0 + timedelta(days=2))  # m1 leaves another cart: a second instance (no order after it)
    send_event(engine, settings, "cart.updated", m1, clock(), f"cart-{m1}-2")
    clock.advance(hours=2)
    advance(engine, settings, clock)  # its wait has passed: the email is planned, not sent yet

    options = ReportOptions(since=t0 - timedelta(hours=1), until=t0 + timedelta(days=3), refresh=False)
    rep = build_report(engine, options)
    sec, = rep.journeys
    assert sec.journey == "cart_test"
    assert (sec.entered, sec.members, sec.held_out, sec.holdout_members) == (7, 6, 4, 4)
    assert sec.by_status == {"active": 1, "completed": 4, "exited": 2, "holdout": 4}
    assert sec.exited == {"purchased": 2}
    steps = {r.step: r for r in sec.steps}
    assert [r.step for r in sec.steps] == ["wait_1h", "email", "wait_click", "push"]
    assert steps["wait_1h"].outcomes == {"passed": 1, "waited": 5} and steps["wait_1h"].reached == 6
    assert steps["email"].reached == 6 and steps["email"].sent == 3 and steps["email"].kind == "send"
    assert sum(steps["email"].outcomes.values()) == 6
    assert steps["wait_click"].outcomes == {"timeout": 4}
    assert steps["push"].reached == 4 and steps["push"].sent == 2
    assert (sec.converted, sec.holdout_converted, sec.attributed) == (2, 1, 0)

    # Naive (instances as independent): 2/7 vs 1/4.
    assert sec.conversion is not None
    assert sec.conversion.treated_rate == pytest.approx(2 / 7) and sec.conversion.control_rate == pytest.approx(0.25)
    # Member-clustered: m1 is one cluster of two instances (one converted), the others one instance each.
    expected = clustered_lift(ClusterSums.from_arrays([1, 1, 0, 0, 0, 0], [2, 1, 1, 1, 1, 1]),
                              ClusterSums.from_arrays([1, 0, 0, 0], [1, 1, 1, 1]), options.confidence)
    check = sec.checks.metric("conversion") if sec.checks else None
    assert check is not None and check.role == "primary"
    assert check.difference == pytest.approx(2 / 7 - 1 / 4)
    assert check.interval == pytest.approx(expected.clustered_interval)
    assert check.p_value == pytest.approx(expected.p_value)
    assert sec.checks is not None and sec.checks.verdict.startswith("no effect shown")

    # Text, HTML and JSON carry the section.
    console = Console(width=120, record=True)
    print_journeys(console, rep.journeys, options)
    text = console.export_text()
    assert "Journey cart_test" in text and "purchased 2" in text and "sent 3" in text
    lift, _ = lift_text(sec)
    assert lift.startswith(f"{100 * check.difference:+.1f} pts [") and "holdout lift on conversion" in text
    page = render_html(rep)
    assert "Journeys: funnel and lift" in page and "cart_test" in page and "wait_click (wait_for)" in page
    assert rep.to_dict()["journeys"][0]["converted"] == 2

    # A report on one unrelated campaign leaves the journey out; on the journey's message it keeps it.
    with engine.connect() as conn:
        from membercare.reports.journeys import journey_sections

        assert journey_sections(conn, ReportOptions(since=options.since, until=options.until,
                                                    campaign="birthday")) == []
        assert len(journey_sections(conn, ReportOptions(since=options.since, until=options.until,
                                                        campaign="cart_test_email"))) == 1
        # The period scopes instances by entry: a report starting after the first carts sees only m1's second.
        late, = journey_sections(conn, ReportOptions(since=t0 + timedelta(days=1), until=options.until))
    assert (late.entered, late.held_out, late.converted) == (1, 0, 0) and late.checks is None
    assert lift_text(late) == ("-", "no holdout")
