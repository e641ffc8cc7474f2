"""What a generated shop is: its constants, the knobs of its statistical model (:class:`ShopModel`), what a
run wrote (:class:`GenerationSummary`) and the state shared by the generation of one shop (:class:`Context`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from membercare.data.generator.catalogue import Catalogue


SHOP_TIMEZONE = "Asia/Taipei"
# Taipei has had no daylight saving time since 1979: a fixed offset keeps the vectorised
# local-day arithmetic exact.
SHOP_OFFSET = 8 * 3600
DAY = 86_400
CURRENCY = "TWD"

BLOCK = 1_000
"""Members per random-generator block. Part of the data's identity: changing it changes the shop."""

# Tables the generator fills, parents first.
SHOP_TABLES: tuple[str, ...] = (
    "members", "products", "consent_events", "consents", "devices", "orders", "order_lines", "coupons",
    "tier_history", "points_ledger",
)


@dataclass(frozen=True)
class ShopModel:
    """Parameters of the generated shop. The defaults are tuned to the targets in the package doc.

    Purchase process (BG/NBD): ``lambda ~ Gamma(shape=r, rate=alpha)`` purchases per day while
    alive; dropout probability after each purchase ``p ~ Beta(a, b)``.
    """

    # Mean rate r/alpha = one purchase per month while alive; dropout mean a/(a+b) = 19 % per purchase
    # with a heavy mass near 0 (loyal members) and near 1 (one-time buyers). With the join-date mix
    # below this gives about 5.0 orders per member, ~30 % one-time buyers among buyers.
    r: float = 0.9
    alpha: float = 27.0
    a: float = 0.75
    b: float = 3.2
    never_buy_share: float = 0.12         # members who registered but never ordered
    signup_purchase_share: float = 0.55   # first order within hours of joining (signed up at checkout)
    max_orders: int = 400                 # safety cap for extreme draws
    zh_share: float = 0.75
    female_share: float = 0.56
    birthday_missing: float = 0.15
    email_missing: float = 0.04
    phone_missing: float = 0.05
    joined_years: float = 3.0
    joined_last_week_share: float = 0.02
    cancel_rate: float = 0.03
    refund_rate: float = 0.02
    # Marketing opt-in at signup, and the share of opted-in members who revoke later, per channel.
    marketing_optin: dict[str, float] = field(default_factory=lambda: {"email": 0.80, "sms": 0.62, "push": 0.72})
    marketing_revoke: dict[str, float] = field(default_factory=lambda: {"email": 0.10, "sms": 0.07, "push": 0.09})
    marketing_late_optin: float = 0.05    # of those who declined at signup, opt in later
    flash_coupon_share: float = 0.07      # members holding a coupon that expires in the next 1-3 days
    points_redeemer_share: float = 0.4


DEFAULT_MODEL = ShopModel()


@dataclass
class GenerationSummary:
    """What :func:`generate_shop` wrote: rows per table and the wall time in seconds."""

    members: int = 0
    products: int = 0
    consent_events: int = 0
    consents: int = 0
    devices: int = 0
    orders: int = 0
    order_lines: int = 0
    coupons: int = 0
    tier_history: int = 0
    points_ledger: int = 0
    seconds: float = 0.0
    seed: int = 0
    as_of: datetime | None = None

    @property
    def counts(self) -> dict[str, int]:
        """``{table: rows}`` in insertion order."""
        d = asdict(self)
        return {t: d[t] for t in SHOP_TABLES}


@dataclass
class Context:
    seed: int
    model: ShopModel
    as_of: int                  # epoch seconds (UTC)
    today: date                 # shop-local date of as_of
    catalogue: Catalogue
    tiers: list[dict]
    next_id: dict[str, int] = field(default_factory=lambda: {t: 1 for t in SHOP_TABLES})

    def take_ids(self, table: str, n: int) -> np.ndarray:
        start = self.next_id[table]
        self.next_id[table] = start + n
        return np.arange(start, start + n, dtype=np.int64)
