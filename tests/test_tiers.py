"""Membership tier reviews: upgrade, renewal, downgrade, refunds, apply and idempotence (both backends)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from membercare import tiers
from membercare.models import Member, TierHistory
from shopdata import Shop, ts

AS_OF = ts("2026-11-23T04:00Z")
RECENT = AS_OF - timedelta(days=20)
m, th = Member.__table__, TierHistory.__table__


def changes(conn, as_of=AS_OF) -> dict[str, tiers.TierChange]:
    return {c.external_id: c for c in tiers.review(conn, as_of)}


def build(conn) -> Shop:
    s = Shop(conn)
    s.member("to_gold")  # NT$12,000 this year: over gold's 10,000 bar
    s.order("to_gold", RECENT, 12_000_00)
    s.member("to_plat_by_orders")  # 15 orders: platinum by order count
    s.orders_every("to_plat_by_orders", AS_OF - timedelta(days=100), n=15, gap_days=5, total=10_00)
    s.member("refund_only")  # the big order was refunded: no upgrade
    s.order("refund_only", RECENT, 50_000_00, status="refunded")
    s.member("silver_quiet")
    # Gold for over a year and still spending above gold's renewal bar (7,000): renewal.
    s.member("gold_keeps", tier="gold", joined="2024-01-01T00:00Z")
    s.tier_period("gold_keeps", "gold", "2025-11-01T00:00Z")
    s.order("gold_keeps", RECENT, 7_500_00)
    # Gold for over a year, below the renewal bar: downgrade to silver.
    s.member("gold_drops", tier="gold", joined="2024-01-01T00:00Z")
    s.tier_period("gold_drops", "gold", "2025-11-01T00:00Z")
    s.order("gold_drops", RECENT, 3_000_00)
    # Gold for only half a year and quiet: not reviewed yet.
    s.member("gold_young", tier="gold", joined="2024-01-01T00:00Z")
    s.tier_period("gold_young", "gold", "2026-05-01T00:00Z")
    # Platinum for over a year, meets gold's renewal bar but not platinum's: lands on gold.
    s.member("plat_to_gold", tier="platinum", joined="2023-01-01T00:00Z")
    s.tier_period("plat_to_gold", "platinum", "2025-10-01T00:00Z")
    s.order("plat_to_gold", RECENT, 8_000_00)
    # Gold without history rows: the period starts at joined_at.
    s.member("gold_nohist", tier="gold", joined="2025-01-01T00:00Z")
    return s


def test_review_classifies_each_case(engine):
    with engine.begin() as conn:
        build(conn)
        got = changes(conn)
        assert {k: (c.from_tier, c.to_tier, c.reason) for k, c in got.items()} == {
            "to_gold": ("silver", "gold", "upgrade"),
            "to_plat_by_orders": ("silver", "platinum", "upgrade"),
            "gold_keeps": ("gold", "gold", "renewal"),
            "gold_drops": ("gold", "silver", "downgrade"),
            "plat_to_gold": ("platinum", "gold", "downgrade"),
            "gold_nohist": ("gold", "silver", "downgrade"),
        }
        assert got["to_gold"].window_spend_minor == 12_000_00 and got["to_plat_by_orders"].window_orders == 15


def test_apply_writes_history_and_is_idempotent(engine):
    with engine.begin() as conn:
        s = build(conn)
        n = tiers.apply(conn, tiers.review(conn, AS_OF), AS_OF)
        assert n == 6
        tier_of = dict(conn.execute(sa.select(m.c.external_id, m.c.tier)).all())
        assert tier_of["to_gold"] == "gold" and tier_of["gold_drops"] == "silver"
        assert tier_of["gold_keeps"] == "gold" and tier_of["gold_young"] == "gold"
        hist = conn.execute(
            sa.select(th.c.tier, th.c.previous_tier, th.c.reason, th.c.valid_from, th.c.valid_to)
            .where(th.c.member_id == s.ids["gold_keeps"]).order_by(th.c.valid_from)
        ).all()
        assert [(h.tier, h.reason, h.valid_to) for h in hist] == [("gold", "upgrade", AS_OF), ("gold", "renewal", None)]
        assert hist[1].valid_from == AS_OF and hist[1].previous_tier == "gold"
        # Same as_of again: nothing left to do.
        assert changes(conn) == {}
        # A year later the renewed member is reviewed again (and has not spent since): downgrade.
        later = changes(conn, AS_OF + timedelta(days=366))
        assert later["gold_keeps"].reason == "downgrade"


def test_upgrade_does_not_wait_for_the_anniversary(engine):
    with engine.begin() as conn:
        s = Shop(conn)
        s.member("g", tier="gold", joined="2026-10-01T00:00Z")
        s.tier_period("g", "gold", "2026-10-01T00:00Z")
        s.orders_every("g", AS_OF - timedelta(days=40), n=2, gap_days=10, total=16_000_00)
        got = changes(conn)
        assert (got["g"].to_tier, got["g"].reason) == ("platinum", "upgrade")
