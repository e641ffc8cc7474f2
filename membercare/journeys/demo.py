"""The demo shop's member events for the journeys, and the simulated clock that replays them.

``membercare demo`` shows journeys the way a shop would live them over a month, in a minute: the events the
shop would have posted to ``POST /events`` over the last :data:`DAYS` days (sign-ups, deliveries, reviews,
carts left and carts bought, points about to expire) are derived from the demo shop's own data, then
replayed on a simulated clock: at each :data:`CHECKPOINTS` instant the events up to it go in through
:func:`membercare.journeys.events.ingest` (the endpoint's own path) and the journeys are advanced *at that
instant*. Nothing sleeps and nothing waits for the wall clock; instances move through their waits because
the clock passed them.

Everything is deterministic for a seed: members are picked by a hash of the seed and their id, and event ids
derive from what they are about (``demo-cart-<member>``, ``demo-delivered-<order>``), so a second demo run
stores nothing new and enters no one again. No member data leaves this module but external ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.journeys.definition import Journey
from membercare.journeys.events import IngestReport, ingest, parse_events
from membercare.models import PURCHASE_STATUSES, Member, Order
from membercare.timeutil import ensure_utc

DAYS = 33  # deliveries a month back: the post-purchase journey's review request comes 30 days after one
# The simulated clock's stops, before "now": three weeks ago (every event of the month before goes in there), two
# weeks, ..., an hour ago, now. Each stop is one flow run: few enough to keep the demo short.
CHECKPOINTS: tuple[timedelta, ...] = (timedelta(days=23), timedelta(days=14), timedelta(days=7),
                                      timedelta(days=2), timedelta(days=1), timedelta(hours=1), timedelta(0))
CART_SHARE, CART_BOUGHT, DELIVERY_SHARE = 0.03, 0.3, 0.5
REVIEW_SHARE, NEGATIVE_SHARE, ANSWER_SHARE, POINTS_SHARE = 0.4, 0.25, 0.4, 0.01


@dataclass(frozen=True)
class DemoEvent:
    at: datetime
    body: dict[str, Any]  # our POST /events shape: id, name, member (external id), at, properties


@dataclass
class Stop:
    """What one stop of the simulated clock did."""

    at: datetime
    events: IngestReport = field(default_factory=IngestReport)


def _share(seed: int, what: str, key: object) -> float:
    digest = hashlib.sha256(f"{what}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def _event(at: datetime, event_id: str, name: str, member: str, **properties: Any) -> DemoEvent:
    return DemoEvent(at, {"id": event_id, "name": name, "member": member, "at": at.isoformat(),
                          "properties": properties})


def demo_events(conn: Connection, now: datetime, *, seed: int) -> list[DemoEvent]:
    """The events the demo shop would have posted over the last :data:`DAYS` days, oldest first."""
    now = ensure_utc(now)
    start = now - timedelta(days=DAYS)
    m, o = Member.__table__, Order.__table__
    out: list[DemoEvent] = []
    for ext, joined in conn.execute(sa.select(m.c.external_id, m.c.joined_at)
                                    .where(m.c.joined_at >= start, m.c.joined_at < now)):
        out.append(_event(ensure_utc(joined), f"demo-joined-{ext}", "member.joined", ext))
    orders = conn.execute(
        sa.select(o.c.external_id, m.c.external_id.label("member"), o.c.placed_at, o.c.delivered_at,
                  o.c.total_minor).join(m, m.c.id == o.c.member_id)
        .where(o.c.status.in_(PURCHASE_STATUSES), o.c.placed_at >= start - timedelta(days=3),
               o.c.placed_at < now - timedelta(days=2)).order_by(o.c.id)).all()
    for r in orders:
        if _share(seed, "delivered", r.external_id) >= DELIVERY_SHARE:
            continue
        delivered = ensure_utc(r.delivered_at) if r.delivered_at is not None else (
            ensure_utc(r.placed_at) + timedelta(days=2))
        if not start <= delivered < now:
            continue
        out.append(_event(delivered, f"demo-delivered-{r.external_id}", "order.delivered", r.member,
                          order=r.external_id))
        reviewed = delivered + timedelta(days=1 + int(5 * _share(seed, "review-day", r.external_id)))
        if _share(seed, "review", r.external_id) < REVIEW_SHARE and reviewed < now:
            out.append(_event(reviewed, f"demo-review-{r.external_id}", "review.written", r.member,
                              order=r.external_id))
            if _share(seed, "negative", r.external_id) < NEGATIVE_SHARE:
                out.append(_event(reviewed, f"demo-negative-{r.external_id}", "review.negative", r.member,
                                  order=r.external_id, value_minor=int(r.total_minor)))
                answered = reviewed + timedelta(days=3)
                if _share(seed, "answer", r.external_id) < ANSWER_SHARE and answered < now:
                    out.append(_event(answered, f"demo-answer-{r.external_id}", "review.answered", r.member))
    for ext, mid, points in conn.execute(sa.select(m.c.external_id, m.c.id, m.c.points_balance).order_by(m.c.id)):
        if _share(seed, "cart", mid) < CART_SHARE:
            # A cart left in the last three days; a share of them bought within the hour.
            left = now - timedelta(minutes=30 + int(_share(seed, "cart-at", mid) * 3 * 24 * 60))
            out.append(_event(left, f"demo-cart-{ext}", "cart.updated", ext, items=1 + mid % 3))
            if _share(seed, "cart-bought", mid) < CART_BOUGHT and left + timedelta(minutes=40) < now:
                out.append(_event(left + timedelta(minutes=40), f"demo-cart-order-{ext}", "order.placed", ext))
        if points and _share(seed, "points", mid) < POINTS_SHARE:
            expires = (now + timedelta(days=3 + mid % 8)).date().isoformat()
            out.append(_event(now - timedelta(days=5), f"demo-points-{ext}", "points.expiring", ext,
                              expires_at=expires, points=int(points)))
    return sorted(out, key=lambda e: (e.at, e.body["id"]))


def checkpoints(now: datetime) -> list[datetime]:
    """The simulated clock's stops, oldest first."""
    return [ensure_utc(now) - back for back in CHECKPOINTS]


def post_until(conn: Connection, events: Sequence[DemoEvent], journeys: Sequence[Journey], after: datetime | None,
               until: datetime) -> IngestReport:
    """Ingest the events in ``(after, until]`` as ``POST /events`` would at ``until`` (parsed from the request
    shape, stored once by id, entering journeys and waking waits)."""
    batch = [e.body for e in events if (after is None or e.at > after) and e.at <= until]
    total = IngestReport()
    for i in range(0, len(batch), 1000):
        parsed, skipped = parse_events({"events": batch[i:i + 1000]}, until, source="api")
        rep = ingest(conn, parsed, journeys, until)
        rep.skipped += skipped
        total.add(rep)
    return total


__all__ = ["CHECKPOINTS", "DAYS", "DemoEvent", "Stop", "checkpoints", "demo_events", "post_until"]
