"""Hand-built shop rows for segment, RFM, churn and tier tests (tiny, explicit, both backends)."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta

import sqlalchemy as sa

from membercare.models import Coupon, Member, Order, OrderLine, TierHistory
from membercare.timeutil import UTC

_seq = itertools.count(1)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class Shop:
    def __init__(self, conn):
        self.conn = conn
        self.ids: dict[str, int] = {}

    def member(self, ext: str, *, tz: str = "Asia/Taipei", joined: datetime | str = "2020-01-01T00:00Z",
               birthday: date | None = None, tier: str = "silver", region: str | None = None,
               email: str | None = None, phone: str | None = None) -> int:
        joined = ts(joined) if isinstance(joined, str) else joined
        mid = self.conn.execute(
            Member.__table__.insert().values(
                external_id=ext, name=f"Member {ext}", email=email or f"{ext}@example.com", phone=phone,
                timezone=tz, birthday=birthday, region=region, joined_at=joined, tier=tier, points_balance=0,
                preferred_channels="email", country="TW", locale="zh-TW", created_at=joined, updated_at=joined,
            ).returning(Member.__table__.c.id)
        ).scalar_one()
        self.ids[ext] = mid
        return mid

    def order(self, ext: str, placed: datetime | str, total: int = 100_00, *, status: str = "paid",
              lines: list[tuple[str, int]] | None = None) -> int:
        placed = ts(placed) if isinstance(placed, str) else placed
        oid = self.conn.execute(
            Order.__table__.insert().values(
                external_id=f"o{next(_seq)}", member_id=self.ids[ext], placed_at=placed, status=status,
                total_minor=total, currency="TWD", updated_at=placed,
            ).returning(Order.__table__.c.id)
        ).scalar_one()
        for i, (category, amount) in enumerate(lines or [], 1):
            self.conn.execute(OrderLine.__table__.insert().values(
                order_id=oid, line_no=i, sku=f"sku-{category}", category=category, quantity=1, amount_minor=amount))
        return oid

    def coupon(self, ext: str, code: str, *, issued: datetime | str, expires: datetime | str,
               redeemed: datetime | str | None = None) -> None:
        conv = lambda v: ts(v) if isinstance(v, str) else v  # noqa: E731
        self.conn.execute(Coupon.__table__.insert().values(
            code=code, member_id=self.ids[ext], kind="amount", amount_minor=100_00, currency="TWD",
            min_spend_minor=0, issued_at=conv(issued), expires_at=conv(expires),
            redeemed_at=conv(redeemed) if redeemed else None,
        ))

    def tier_period(self, ext: str, tier: str, valid_from: datetime | str, reason: str = "upgrade") -> None:
        valid_from = ts(valid_from) if isinstance(valid_from, str) else valid_from
        self.conn.execute(TierHistory.__table__.insert().values(
            member_id=self.ids[ext], tier=tier, reason=reason, valid_from=valid_from, decided_at=valid_from))

    def orders_every(self, ext: str, start: datetime | str, *, n: int, gap_days: float, total: int = 100_00) -> None:
        start = ts(start) if isinstance(start, str) else start
        for i in range(n):
            self.order(ext, start + timedelta(days=gap_days * i), total)

    def ext_of(self, member_ids) -> set[str]:
        rev = {v: k for k, v in self.ids.items()}
        return {rev[i] for i in member_ids}


def member_ids(conn, select) -> set[int]:
    q = select.subquery()
    return {r[0] for r in conn.execute(sa.select(q.c.member_id))}
