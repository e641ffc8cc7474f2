"""Conversion attribution: windows at their boundaries, last/first touch, refunds, coupons, holdouts, idempotency."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.engagement.attribution import (
    AttributionSettings,
    TouchLevel,
    compute_attributions,
)
from membercare.engagement.attribution_models import Attribution
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import Coupon, Member, Order

T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
A = Attribution.__table__
SINCE, UNTIL = T0 - timedelta(days=30), T0 + timedelta(days=30)


class Shop:
    """Hand-built ledger rows: runs, outbox messages, engagement events, orders and coupons."""

    def __init__(self, engine):
        self.engine = engine
        self.n = 0

    def _next(self) -> int:
        self.n += 1
        return self.n

    def member(self) -> int:
        i = self._next()
        with self.engine.begin() as c:
            return c.execute(sa.insert(Member.__table__).returning(Member.__table__.c.id), dict(
                external_id=f"M{i}", name=f"Member {i}", email=f"m{i}@example.test", joined_at=T0 - timedelta(days=99),
            )).scalar_one()

    def run(self, campaign: str, occurrence: str = "2026-11-02", purpose: str = "marketing", as_of=T0) -> int:
        with self.engine.begin() as c:
            return c.execute(sa.insert(CampaignRun.__table__).returning(CampaignRun.__table__.c.id), dict(
                campaign=campaign, occurrence=occurrence, purpose=purpose, priority=0, as_of=as_of, status="completed",
                error_budget=0.5, counts="{}", created_at=as_of, updated_at=as_of,
            )).scalar_one()

    def message(self, run: int, member: int, *, channel: str | None = "email", variant: str | None = None,
                state: str = "sent", purpose: str = "marketing", at=T0, campaign: str | None = None) -> str:
        i = self._next()
        mid = f"msg{i:04d}"
        with self.engine.connect() as c:
            r = c.execute(sa.select(CampaignRun.__table__).where(CampaignRun.__table__.c.id == run)).one()
        with self.engine.begin() as c:
            c.execute(sa.insert(OutboxMessage.__table__), dict(
                message_id=mid, run_id=run, campaign=campaign or r.campaign, occurrence=r.occurrence, member_id=member,
                idempotency_key=f"{r.campaign}|{r.occurrence}|{member}|{i}", variant=variant, purpose=purpose,
                priority=0, channel=channel, fallback_channels="", state=state,
                reason_code="holdout" if variant == "holdout" else "sent", reason="test", attempts=1,
                transient_failures=0, scheduled_at=at, sent_at=at if state == "sent" else None, created_at=at,
                updated_at=at,
            ))
        return mid

    def event(self, mid: str | None, kind: str, at: datetime, *, channel: str = "email", member: int | None = None):
        i = self._next()
        with self.engine.begin() as c:
            c.execute(sa.insert(EngagementEventRow.__table__), dict(
                provider="sendgrid", provider_event_id=f"ev{i}", kind=kind, channel=channel, message_id=mid,
                member_id=member, occurred_at=at, received_at=at, raw="{}",
                bounce_class="soft" if kind == "bounced" else None,
            ))

    def order(self, member: int, at: datetime, total: int = 10_000, status: str = "paid") -> int:
        i = self._next()
        with self.engine.begin() as c:
            return c.execute(sa.insert(Order.__table__).returning(Order.__table__.c.id), dict(
                external_id=f"O{i}", member_id=member, placed_at=at, status=status, total_minor=total,
                currency="TWD", updated_at=at,
            )).scalar_one()

    def coupon(self, member: int, redeemed_at: datetime | None, order_id: int | None) -> int:
        i = self._next()
        with self.engine.begin() as c:
            return c.execute(sa.insert(Coupon.__table__).returning(Coupon.__table__.c.id), dict(
                code=f"C{i}", member_id=member, kind="amount", amount_minor=5000, currency="TWD",
                min_spend_minor=0, issued_at=T0 - timedelta(days=10), expires_at=T0 + timedelta(days=60),
                redeemed_at=redeemed_at, redeemed_order_id=order_id,
            )).scalar_one()

    def credits(self, model: str = "last_touch") -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(A).where(A.c.model == model).order_by(
                A.c.conversion_type, A.c.conversion_id, A.c.message_id)).mappings().all()
        return [{k: v for k, v in r.items() if k not in ("id", "computed_at")} for r in rows]


@pytest.fixture
def shop(engine):
    return Shop(engine)


def credited(shop, model="last_touch") -> dict[tuple[str, int], str]:
    return {(r["conversion_type"], r["conversion_id"]): r["message_id"] for r in shop.credits(model)}


def test_window_boundaries_and_order_before_the_touch(shop):
    m = shop.member()
    run = shop.run("spring")
    mid = shop.message(run, m)
    shop.event(mid, "opened", T0 + timedelta(hours=1))
    w = timedelta(days=7)
    before = shop.order(m, T0 + timedelta(minutes=59))  # placed before the open: no credit
    same_instant = shop.order(m, T0 + timedelta(hours=1))  # at the touch itself: credited
    last_ms = shop.order(m, T0 + timedelta(hours=1) + w - timedelta(milliseconds=1))  # inside, by 1 ms
    at_end = shop.order(m, T0 + timedelta(hours=1) + w)  # exactly at the window's end: excluded (half-open)
    res = compute_attributions(shop.engine, SINCE, UNTIL)
    got = credited(shop)
    assert got == {("order", same_instant): mid, ("order", last_ms): mid}
    assert ("order", before) not in got and ("order", at_end) not in got
    assert res.orders == 2 and res.revenue_minor == 20_000


def test_refunded_and_cancelled_orders_earn_nothing_and_a_later_refund_removes_the_credit(shop):
    m = shop.member()
    mid = shop.message(shop.run("spring"), m)
    shop.event(mid, "clicked", T0)
    refunded = shop.order(m, T0 + timedelta(days=1), status="refunded")
    cancelled = shop.order(m, T0 + timedelta(days=1), status="cancelled")
    good = shop.order(m, T0 + timedelta(days=2), status="paid")
    compute_attributions(shop.engine, SINCE, UNTIL)
    assert set(credited(shop)) == {("order", good)}
    assert refunded and cancelled
    with shop.engine.begin() as c:
        c.execute(sa.update(Order.__table__).where(Order.__table__.c.id == good).values(status="refunded"))
    compute_attributions(shop.engine, SINCE, UNTIL)
    assert credited(shop) == {}


def test_last_touch_by_default_first_touch_as_an_option(shop):
    m = shop.member()
    a = shop.message(shop.run("welcome"), m)
    b = shop.message(shop.run("sale"), m, channel="push")
    shop.event(a, "opened", T0)
    shop.event(b, "push_opened", T0 + timedelta(days=2), channel="push")
    shop.event(a, "clicked", T0 + timedelta(days=1))
    order = shop.order(m, T0 + timedelta(days=3))
    compute_attributions(shop.engine, SINCE, UNTIL)
    (row,) = shop.credits()
    assert (row["message_id"], row["campaign"], row["channel"], row["touch_kind"]) == (b, "sale", "push", "push_opened")
    assert row["order_id"] == order and row["revenue_minor"] == 10_000
    compute_attributions(shop.engine, SINCE, UNTIL, AttributionSettings(model="first_touch"))
    (row,) = shop.credits("first_touch")
    assert (row["message_id"], row["touch_kind"]) == (a, "opened")
    assert len(shop.credits("last_touch")) == 1  # each model keeps its own rows


def test_touch_levels_per_channel(shop):
    m = shop.member()
    email = shop.message(shop.run("news"), m)
    sms = shop.message(shop.run("flash"), m, channel="sms")
    shop.event(email, "delivered", T0)
    shop.event(sms, "delivered", T0 + timedelta(hours=1), channel="sms")
    order = shop.order(m, T0 + timedelta(days=1))
    compute_attributions(shop.engine, SINCE, UNTIL)  # default: SMS delivered counts, email delivered does not
    assert credited(shop) == {("order", order): sms}
    compute_attributions(shop.engine, SINCE, UNTIL, AttributionSettings().with_level(TouchLevel.OPENED))
    assert credited(shop) == {}
    s = AttributionSettings(touch={"email": "delivered", "sms": "clicked", "push": "clicked"})
    compute_attributions(shop.engine, SINCE, UNTIL, s)
    assert credited(shop) == {("order", order): email}


def test_only_the_members_own_marketing_messages_count_and_variant_is_credited(shop):
    ann, bo = shop.member(), shop.member()
    run = shop.run("subject_test")
    a = shop.message(run, ann, variant="B")
    receipt = shop.message(shop.run("receipt", purpose="transactional"), bo, purpose="transactional")
    shop.event(a, "opened", T0)
    shop.event(receipt, "clicked", T0)
    ann_order, bo_order = shop.order(ann, T0 + timedelta(days=1)), shop.order(bo, T0 + timedelta(days=1))
    compute_attributions(shop.engine, SINCE, UNTIL)
    rows = shop.credits()
    assert [(r["order_id"], r["message_id"], r["variant"], r["member_id"]) for r in rows] == [(ann_order, a, "B", ann)]
    assert bo_order not in {r["order_id"] for r in rows}


def test_coupon_redemptions_are_credited_without_double_revenue(shop):
    m = shop.member()
    mid = shop.message(shop.run("coupon_push"), m, channel="push")
    shop.event(mid, "push_opened", T0, channel="push")
    order = shop.order(m, T0 + timedelta(days=1), total=25_000)
    redeemed = shop.coupon(m, T0 + timedelta(days=1), order)
    refunded_order = shop.order(m, T0 + timedelta(days=2), status="refunded")
    on_refund = shop.coupon(m, T0 + timedelta(days=2), refunded_order)
    unredeemed = shop.coupon(m, None, None)
    res = compute_attributions(shop.engine, SINCE, UNTIL)
    rows = {(r["conversion_type"], r["conversion_id"]): r for r in shop.credits()}
    assert set(rows) == {("order", order), ("coupon", redeemed)}
    assert rows[("coupon", redeemed)]["order_id"] == order and rows[("coupon", redeemed)]["revenue_minor"] == 0
    assert (res.orders, res.coupons, res.revenue_minor) == (1, 1, 25_000)
    assert on_refund and unredeemed


def test_holdout_members_conversions_count_for_their_campaigns_holdout(shop):
    held, treated = shop.member(), shop.member()
    run = shop.run("winback")
    h = shop.message(run, held, channel=None, variant="holdout", state="skipped")
    t = shop.message(run, treated)
    shop.event(t, "opened", T0 + timedelta(hours=2))
    held_order = shop.order(held, T0 + timedelta(days=3), total=7_000)
    late = shop.order(held, T0 + timedelta(days=7))  # at the window's end: not counted
    early = shop.order(held, T0 - timedelta(seconds=1))  # before the (unsent) message: not counted
    shop.order(treated, T0 + timedelta(days=1))
    res = compute_attributions(shop.engine, SINCE, UNTIL)
    rows = shop.credits("holdout")
    assert [(r["order_id"], r["message_id"], r["campaign"], r["channel"], r["touch_kind"]) for r in rows] == [
        (held_order, h, "winback", None, "holdout")]
    assert res.holdout == 1 and late and early
    assert [r["member_id"] for r in shop.credits()] == [treated]  # the holdout member has no touch credit


def test_recompute_is_idempotent_and_only_touches_its_range(shop):
    m = shop.member()
    mid = shop.message(shop.run("spring"), m)
    shop.event(mid, "opened", T0)
    first = shop.order(m, T0 + timedelta(days=1))
    second = shop.order(m, T0 + timedelta(days=5))
    compute_attributions(shop.engine, SINCE, UNTIL)
    before = shop.credits()
    compute_attributions(shop.engine, SINCE, UNTIL)
    assert shop.credits() == before and len(before) == 2
    # A recompute of a narrower range keeps the rows outside it.
    with shop.engine.begin() as c:
        c.execute(sa.update(Order.__table__).where(Order.__table__.c.id == first).values(status="refunded"))
        c.execute(sa.update(Order.__table__).where(Order.__table__.c.id == second).values(status="refunded"))
    compute_attributions(shop.engine, T0 + timedelta(days=3), UNTIL)
    assert [r["order_id"] for r in shop.credits()] == [first]


def test_settings_are_validated():
    with pytest.raises(InputError):
        AttributionSettings(window=timedelta(0))
    with pytest.raises(InputError):
        AttributionSettings(model="holdout")
    with pytest.raises(ValueError):
        AttributionSettings(touch={"fax": "opened"})
