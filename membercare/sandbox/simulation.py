"""A simulated shop for the provider sandbox: members with hidden preferences, simulated time, purchases.

The sandbox's simulated recipients normally act on a fixed rate table. This module replaces that table by a
*hidden truth* per member, so that a benchmark can run a recurring campaign through the real pipeline
(planner, dispatcher with the real SDKs, signed webhooks, receiver, attribution) and check whether the
optimisation strategies find what was planted (``bench/optimise_sandbox.py``):

* **channel**: an engagement probability per channel. One channel is the member's truly best one; the
  member's *stated* preference names it only ``stated_matches_best`` of the time (people tick "email" on
  the sign-up form and then read their push notifications);
* **hour**: a best local hour. A message engages less the further from it (in the member's own time zone)
  it is delivered: ``floor + (1 - floor) * exp(-d^2 / (2 width^2))`` at a distance of ``d`` hours;
* **variant**: a shared appeal per template variant, with one planted winner.

A message's engagement probability (email click, push tap) is
``min(cap, theta[member, channel] * hour_factor * appeal[variant])``; an email is opened with
``min(0.95, open_factor * p)`` and clicked given an open with the rest, so that ``P(click) = p``.
A share of the messages that were clicked (or tapped) lead to an order a little later
(:meth:`ShopSimulation.conversions`), which the harness imports through the normal order importer.

Simulated time: :class:`ShopSimulation` is both the sandbox's ``EngagementModel`` and its ``EventClock``.
The harness sets :attr:`ShopSimulation.now` (the same clock it gives the dispatcher), so a message is
"delivered" at the simulated instant it was sent, and its events are stamped with that instant plus a
short, seeded delay (opens within the hour, clicks a few minutes after the open).

Everything is deterministic given the seed and our message ids; nothing here imports Prefect. The truth is
hidden from the pipeline: it only ever sees the webhooks and the orders.
"""

from __future__ import annotations

import csv
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.sandbox.config import EngagementRates
from membercare.sandbox.recipients import RecipientContext
from membercare.sandbox.state import seeded_rng
from membercare.timeutil import UTC, ensure_utc

HOURS = 24


@dataclass(frozen=True)
class SimMember:
    """What the simulation needs to know about a member of the shop (no contact data)."""

    member_id: int
    external_id: str
    timezone: str
    preferred: tuple[str, ...]  # stated channel order, most preferred first


def load_members(engine: Engine) -> list[SimMember]:
    """The shop's members, ordered by id, with their time zone and stated channel preference."""
    from membercare.models import Member

    m = Member.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(m.c.id, m.c.external_id, m.c.timezone, m.c.preferred_channels)
                            .order_by(m.c.id)).all()
    out = []
    for mid, ext, tz, pref in rows:
        order = tuple(c.strip() for c in (pref or "").replace(">", ",").split(",") if c.strip())
        out.append(SimMember(int(mid), str(ext), tz or "Asia/Taipei", order))
    return out


@dataclass(frozen=True)
class TruthSettings:
    """How the hidden truth is drawn. Defaults: a clear but realistic signal for each strategy."""

    channels: tuple[str, ...] = ("email", "push")
    best_rate: float = 0.20  # mean engagement on the member's best channel (best hour, control variant)
    other_rate: float = 0.05  # mean engagement on the other channels
    concentration: float = 12.0  # Beta strength of the per-member draws around those means
    # P(the stated preferred channel is the truly best one): informative, as people mostly know (issue 17; was 0.35,
    # worse than a coin flip, which made the preference baseline a straw man).
    stated_matches_best: float = 0.65
    best_hours: tuple[int, int] = (11, 20)  # true best local hours are drawn uniformly from [lo, hi]
    hour_floor: float = 0.30  # engagement multiplier far from the best hour
    hour_width: float = 1.5  # hours (Gaussian width of the multiplier)
    variants: tuple[str, ...] = ("a", "b", "c")
    appeal: tuple[float, ...] = (1.00, 1.40, 1.15)  # per variant; planted winner: the largest
    cap: float = 0.90
    open_factor: float = 2.5  # P(open) = min(0.95, open_factor * P(click)) for email
    delivered: float = 0.99
    # P(an open or tap happens right after delivery); else at the member's next best hour. 1.0: event timing is
    # driven by the send time alone, so event hours carry no planted best-hour signal (issue 17); 0.3 restores the
    # old leaky scenario, in which a send-time model could read the hidden hour straight from event times.
    read_soon: float = 1.0
    conversion_per_click: float = 0.15  # P(order | click or tap)
    order_value_minor: tuple[int, int] = (50_000, 300_000)  # uniform order value range (minor units)

    def __post_init__(self) -> None:
        if len(self.variants) != len(self.appeal):
            raise ValueError("one appeal per variant is needed")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError("channels must be non-empty and distinct")
        lo, hi = self.best_hours
        if not 0 <= lo <= hi < HOURS:
            raise ValueError(f"best_hours must satisfy 0 <= lo <= hi < 24, got {self.best_hours}")
        for name in ("best_rate", "other_rate", "stated_matches_best", "hour_floor", "cap", "delivered",
                     "read_soon", "conversion_per_click"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")

    @property
    def winner(self) -> str:
        return self.variants[int(np.argmax(self.appeal))]


@dataclass
class HiddenTruth:
    """Per-member truth, aligned with ``members`` (index ``i`` <-> ``members[i]``)."""

    settings: TruthSettings
    members: list[SimMember]
    theta: np.ndarray  # (n, channels) engagement probability at the best hour with the control variant
    best_channel: np.ndarray  # (n,) index into settings.channels
    stated_channel: np.ndarray  # (n,) index of the stated preference among the channels
    best_hour: np.ndarray  # (n,) local hour
    index: dict[int, int] = field(default_factory=dict)  # member_id -> row

    @classmethod
    def generate(cls, members: Sequence[SimMember], *, seed: int,
                 settings: TruthSettings | None = None) -> HiddenTruth:
        """Draw the truth; depends only on ``seed``, ``settings`` and the members' ids and preferences."""
        s = settings or TruthSettings()
        members = sorted(members, key=lambda m: m.member_id)
        n, C = len(members), len(s.channels)
        rng = np.random.default_rng([int(seed), 0x5EED])
        stated = np.array([_stated_index(m.preferred, s.channels) for m in members], dtype=np.int64)
        matches = rng.random(n) < s.stated_matches_best
        # Otherwise one of the other channels, uniformly.
        shift = rng.integers(1, C, n) if C > 1 else np.zeros(n, dtype=np.int64)
        best = np.where(matches, stated, (stated + shift) % C)
        k = s.concentration
        theta = rng.beta(s.other_rate * k, (1 - s.other_rate) * k, (n, C))
        top = rng.beta(s.best_rate * k, (1 - s.best_rate) * k, n)
        # The best channel must really be the best: its draw is at least the others' maximum.
        theta[np.arange(n), best] = np.maximum(top, theta.max(axis=1) + 1e-3)
        hours = rng.integers(s.best_hours[0], s.best_hours[1] + 1, n)
        truth = cls(s, list(members), theta, best, stated, hours)
        truth.index = {m.member_id: i for i, m in enumerate(members)}
        return truth

    def row(self, member_id: int) -> int:
        return self.index[member_id]

    def channel_index(self, channel: str) -> int | None:
        try:
            return self.settings.channels.index(channel)
        except ValueError:
            return None

    def local_hour(self, member_id: int, at: datetime) -> float:
        """The member's local clock at ``at``, as fractional hours."""
        local = ensure_utc(at).astimezone(ZoneInfo(self.members[self.row(member_id)].timezone))
        return local.hour + local.minute / 60 + local.second / 3600

    def hour_distance(self, member_id: int, at: datetime) -> float:
        """Circular distance in hours between ``at`` (member-local) and the middle of the best hour."""
        d = abs(self.local_hour(member_id, at) - (self.best_hour[self.row(member_id)] + 0.5)) % HOURS
        return min(d, HOURS - d)

    def hour_factor(self, member_id: int, at: datetime) -> float:
        s = self.settings
        d = self.hour_distance(member_id, at)
        return s.hour_floor + (1 - s.hour_floor) * math.exp(-d * d / (2 * s.hour_width ** 2))

    def appeal(self, variant: str | None) -> float:
        """A variant's appeal; messages without a variant carry the control copy (the first variant)."""
        s = self.settings
        if variant in s.variants:
            return s.appeal[s.variants.index(variant)]
        return s.appeal[0]

    def engage_probability(self, member_id: int, channel: str, variant: str | None, at: datetime) -> float:
        """P(click or tap) of one message: the hidden truth in one number."""
        c = self.channel_index(channel)
        if c is None or member_id not in self.index:
            return 0.0
        p = self.theta[self.row(member_id), c] * self.hour_factor(member_id, at) * self.appeal(variant)
        return float(min(self.settings.cap, p))

    def next_active(self, member_id: int, after: datetime) -> datetime:
        """The start of the member's next best local hour at or after ``after`` (``after`` itself when the
        member is inside it now)."""
        zone = ZoneInfo(self.members[self.row(member_id)].timezone)
        after = ensure_utc(after)
        local = after.astimezone(zone)
        hour = int(self.best_hour[self.row(member_id)])
        if local.hour == hour:
            return after
        start = local.replace(hour=hour, minute=0, second=0, microsecond=0)
        if start <= local:
            start = (local + timedelta(days=1)).replace(hour=hour, minute=0, second=0, microsecond=0)
        return start.astimezone(UTC)

    def is_best_channel(self, member_id: int, channel: str) -> bool:
        return self.channel_index(channel) == int(self.best_channel[self.row(member_id)])

    def within_best_hour(self, member_id: int, at: datetime, tolerance: int = 1) -> bool:
        """True when the local *hour* of ``at`` is within ``tolerance`` hours of the best hour (circular)."""
        h = int(self.local_hour(member_id, at)) % HOURS
        d = abs(h - int(self.best_hour[self.row(member_id)]))
        return min(d, HOURS - d) <= tolerance

    def summary(self) -> dict:
        s = self.settings
        n = len(self.members)
        return {
            "members": n,
            "channels": list(s.channels),
            "best_channel_share": {ch: round(float(np.mean(self.best_channel == i)), 4)
                                   for i, ch in enumerate(s.channels)},
            "stated_is_best": round(float(np.mean(self.best_channel == self.stated_channel)), 4),
            "mean_theta": {ch: round(float(self.theta[:, i].mean()), 4) for i, ch in enumerate(s.channels)},
            "mean_theta_best": round(float(self.theta[np.arange(n), self.best_channel].mean()), 4),
            "best_hours": {str(h): int(np.sum(self.best_hour == h)) for h in sorted(set(self.best_hour.tolist()))},
            "variants": dict(zip(s.variants, s.appeal, strict=True)),
            "planted_winner": s.winner,
            "conversion_per_click": s.conversion_per_click,
        }


def _stated_index(preferred: Sequence[str], channels: Sequence[str]) -> int:
    for ch in preferred:
        if ch in channels:
            return channels.index(ch)
    return 0


@dataclass(frozen=True)
class Delivery:
    """One message as the simulated recipient saw it."""

    message_id: str
    member_id: int
    channel: str
    variant: str | None
    at: datetime
    probability: float


@dataclass(frozen=True)
class SimOrder:
    order_id: str
    member_id: int
    external_member_id: str
    message_id: str
    placed_at: datetime
    amount_minor: int


class ShopSimulation:
    """The sandbox's ``EngagementModel`` and ``EventClock`` for a shop with a :class:`HiddenTruth`.

    Usage (see ``bench/optimise_sandbox.py``)::

        sim = ShopSimulation(truth, seed=7)
        server = SandboxServer(config, model=sim, clock=sim.event_time)
        sim.now = as_of                       # the dispatcher's clock reads the same attribute
        sim.register(rows)                    # (message_id, member_id, variant) from outbox_messages
        ... dispatch ...
        orders = sim.conversions(clicks)      # (message_id, member_id, clicked_at) from engagement_events

    The sandbox calls the model on its own thread; the registry and the delivery log are guarded by a lock.
    """

    def __init__(self, truth: HiddenTruth, *, seed: int, now: datetime | None = None):
        self.truth = truth
        self.seed = int(seed)
        self._now = ensure_utc(now) if now is not None else datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()
        self._messages: dict[str, tuple[int, str | None]] = {}
        self.deliveries: dict[str, Delivery] = {}
        self.unknown_messages = 0

    # ------------------------------------------------------------------ clock

    @property
    def now(self) -> datetime:
        return self._now

    @now.setter
    def now(self, value: datetime) -> None:
        self._now = ensure_utc(value)

    def clock(self) -> datetime:
        """The simulated instant (give this to the dispatcher: ``Dispatcher(..., clock=sim.clock)``)."""
        return self._now

    # ------------------------------------------------------------------ messages

    def register(self, rows: Iterable[tuple[str, int, str | None]]) -> int:
        """Tell the simulation who each message id is for and which variant it carries; returns how many."""
        n = 0
        with self._lock:
            for message_id, member_id, variant in rows:
                self._messages[str(message_id)] = (int(member_id), variant)
                n += 1
        return n

    def __call__(self, ctx: RecipientContext) -> EngagementRates:
        """The engagement model: rates for this message from the truth, at the simulated delivery instant."""
        s = self.truth.settings
        message_id = ctx.message_id or ""
        with self._lock:
            known = self._messages.get(message_id)
            if known is None:
                self.unknown_messages += 1
                return EngagementRates(delivered=s.delivered)
            member_id, variant = known
        at = self._now
        p = self.truth.engage_probability(member_id, ctx.channel, variant, at)
        with self._lock:
            self.deliveries[message_id] = Delivery(message_id, member_id, ctx.channel, variant, at, p)
        if ctx.channel == "email":
            opened = min(0.95, s.open_factor * p)
            clicked = p / opened if opened > 0 else 0.0
            return EngagementRates(delivered=s.delivered, opened=opened, clicked=min(1.0, clicked))
        if ctx.channel == "push":  # a tap is the push "click"
            return EngagementRates(delivered=s.delivered, opened=p)
        return EngagementRates(delivered=s.delivered)  # SMS: no open or click signal exists

    def event_time(self, ctx: RecipientContext, event: str) -> float:
        """The event clock: the delivery instant plus a seeded, event-specific delay (Unix seconds).

        People read when they pay attention: with probability ``read_soon`` an open (or tap) follows the
        delivery within the hour (exponential, mean 12 min, capped at 50 min); otherwise it happens during
        the member's next best local hour (uniform within it). The default ``read_soon = 1`` keeps every event
        near the delivery, so event times say when the shop sent, never the hidden hour. A click comes 20 s to 4 min
        after its open, an unsubscribe or spam report 5 min after it.
        """
        mid = ctx.message_id or ""
        with self._lock:
            d = self.deliveries.get(mid)
        at = d.at if d is not None else self._now
        base = at.timestamp()
        r = seeded_rng(self.seed, "event-time", mid)
        processed = 1.0
        delivered = 2.0 + 28.0 * r.random()
        soon = r.random() < self.truth.settings.read_soon
        opened = delivered + min(-720.0 * math.log(1.0 - r.random()), 3000.0)
        if not soon and d is not None:
            active = self.truth.next_active(d.member_id, at + timedelta(seconds=delivered)).timestamp()
            opened = max(opened, active - base + 3300.0 * r.random())
        clicked = opened + 20.0 + 220.0 * r.random()
        offsets = {"processed": processed, "delivered": delivered, "bounce": delivered, "dropped": processed,
                   "open": opened, "click": clicked, "unsubscribe": opened + 300.0, "spamreport": opened + 300.0,
                   "received": delivered, "opened": opened, "dismissed": opened}
        return base + offsets.get(event, delivered)

    # ------------------------------------------------------------------ purchases

    def conversions(self, engaged: Iterable[tuple[str, int, datetime]]) -> list[SimOrder]:
        """Orders caused by engaged messages: each ``(message_id, member_id, engaged_at)`` (first click or
        tap of a message) leads to an order with probability ``conversion_per_click``, placed 5 to 50 min
        later. Deterministic per message id; a message converts at most once whatever is passed twice."""
        s = self.truth.settings
        out: dict[str, SimOrder] = {}
        for message_id, member_id, at in engaged:
            if message_id in out or member_id not in self.truth.index:
                continue
            member = self.truth.members[self.truth.row(member_id)]
            order = draw_order(self.seed, "order", message_id, member_id, member.external_id, at,
                               rate=s.conversion_per_click, delay_s=(300, 3000), value_minor=s.order_value_minor)
            if order is not None:
                out[message_id] = order
        return sorted(out.values(), key=lambda o: (o.placed_at, o.order_id))


def draw_order(seed: int, tag: str, message_id: str, member_id: int, external_member_id: str, engaged_at: datetime, *,
               rate: float, delay_s: tuple[float, float], value_minor: tuple[int, int]) -> SimOrder | None:
    """The order an engaged message leads to, or ``None``: with probability ``rate``, placed ``delay_s``
    after ``engaged_at`` for an amount in ``value_minor`` (rounded to whole units). Deterministic per
    ``(seed, tag, message_id)``; the order id is derived from the message id."""
    r = seeded_rng(seed, tag, message_id)
    if r.random() >= rate:
        return None
    placed = ensure_utc(engaged_at) + timedelta(seconds=delay_s[0] + (delay_s[1] - delay_s[0]) * r.random())
    lo, hi = value_minor
    amount = int(round((lo + (hi - lo) * r.random()) / 100)) * 100
    return SimOrder(f"SIM-{message_id[:16]}", member_id, external_member_id, message_id, placed, amount)


ORDER_COLUMNS = ("order_id", "member_id", "placed_at", "status", "line_no", "sku", "product_name", "category",
                 "quantity", "line_amount", "currency")


def write_orders_csv(orders: Sequence[SimOrder], path: Path, *, currency: str = "TWD",
                     sku: str = "SIM-PICK", product: str = "Simulated pick", category: str = "simulated") -> Path:
    """The orders as an ``orders`` import file (docs/import-formats.md), one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(ORDER_COLUMNS)
        for o in orders:
            w.writerow((o.order_id, o.external_member_id, o.placed_at.isoformat().replace("+00:00", "Z"), "paid", 1,
                        sku, product, category, 1, f"{o.amount_minor / 100:.2f}", currency))
    return path


def reachable_setup_csvs(members: Sequence[SimMember], directory: Path, *, at: datetime,
                         channels: Mapping[str, bool] | None = None) -> dict[str, Path]:
    """Import files that make every member consent to marketing on the simulated channels and reachable
    by push (one live device each): ``{"consents": path, "devices": path}``. Members without an email
    address stay unreachable by email, as in any shop."""
    channels = channels or {"email": True, "push": True}
    directory.mkdir(parents=True, exist_ok=True)
    stamp = ensure_utc(at).isoformat().replace("+00:00", "Z")
    consents = directory / "consents.csv"
    with consents.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("member_id", "channel", "purpose", "granted", "occurred_at", "source"))
        for m in members:
            for ch, granted in channels.items():
                w.writerow((m.external_id, ch, "marketing", "yes" if granted else "no", stamp, "preference_center"))
    out = {"consents": consents}
    if channels.get("push"):
        devices = directory / "devices.csv"
        with devices.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(("member_id", "token", "platform", "app_id", "last_seen_at"))
            for m in members:
                token = "sim-" + seeded_rng(0, "token", m.external_id).getrandbits(128).to_bytes(16, "big").hex()
                w.writerow((m.external_id, token, "android", "example.shop.app", stamp))
        out["devices"] = devices
    return out


__all__ = [
    "Delivery", "HiddenTruth", "ORDER_COLUMNS", "ShopSimulation", "SimMember", "SimOrder", "TruthSettings",
    "draw_order", "load_members", "reachable_setup_csvs", "write_orders_csv",
]


# ---------------------------------------------------------------------------------------------------------------------
# Purchases for the demo (real time, no hidden truth)

DEMO_CONVERSION_PER_CLICK = 0.3  # generous on purpose: a 3,000-member demo gets ~30 clicks
DEMO_ORDER_VALUE_MINOR = (49_900, 329_900)  # NT$499-3,299, in hundredths
ENGAGED_KINDS = ("clicked", "push_opened")  # a click (email) or a tap (push): what can lead to an order


def engaged_since(engine: Engine, since: datetime) -> list[tuple[str, int, str, datetime]]:
    """``(message_id, member_id, member external id, first click or tap)`` of every message clicked or
    tapped since ``since`` (by receipt), one row per message."""
    from membercare.engagement.models import EngagementEventRow
    from membercare.models import Member

    e, m = EngagementEventRow.__table__, Member.__table__
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(e.c.message_id, e.c.member_id, m.c.external_id, sa.func.min(e.c.occurred_at))
            .join(m, m.c.id == e.c.member_id)
            .where(e.c.kind.in_(ENGAGED_KINDS), e.c.received_at >= since, e.c.message_id.is_not(None))
            .group_by(e.c.message_id, e.c.member_id, m.c.external_id)).all()
    out = []
    for mid, member, ext, first in rows:
        # min() over the column comes back as text on SQLite, stored as UTC
        first = datetime.fromisoformat(first) if isinstance(first, str) else first
        out.append((mid, int(member), ext, first if first.tzinfo else first.replace(tzinfo=UTC)))
    return out


def demo_orders(engine: Engine, since: datetime, *, seed: int, now: datetime,
                rate: float = DEMO_CONVERSION_PER_CLICK, value_minor: tuple[int, int] = DEMO_ORDER_VALUE_MINOR,
                engaged: Sequence[tuple[str, int, str, datetime]] | None = None) -> list[SimOrder]:
    """Simulated orders for the demo: each message first clicked or tapped since ``since`` (``engaged``, when
    the caller already read :func:`engaged_since`) leads to an order with probability ``rate``, placed 20-120 s
    after the click (never after ``now``; a click in the last second leads to none yet).

    The demo's recipients only open, click, bounce and unsubscribe; without orders the report's revenue and
    lift sections would stay empty. Deterministic per message id (``seeded_rng``), so a rerun yields the
    same order ids, which the order importer then treats as already imported.
    """
    latest = ensure_utc(now) - timedelta(seconds=1)
    out = []
    for message_id, member_id, external_id, first in (engaged if engaged is not None else engaged_since(engine, since)):
        if ensure_utc(first) >= latest:
            # Clicked this very second (or stamped ahead by a busy sandbox): an order clamped to ``now`` would
            # precede the click it is meant to follow, and could never be attributed to it.
            continue
        order = draw_order(seed, "demo-order", message_id, member_id, external_id, first, rate=rate,
                           delay_s=(20, 120), value_minor=value_minor)
        if order is not None:
            out.append(replace(order, placed_at=min(order.placed_at, latest)))
    return sorted(out, key=lambda o: (o.placed_at, o.order_id))
