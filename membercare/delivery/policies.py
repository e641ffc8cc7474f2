"""Cross-campaign delivery policies: frequency caps, quiet hours, and the settings that tune them.

These are pure functions over small value objects so that they can be tested table-driven and
applied set-based per batch by the planner (caps, quiet hours) and again by the dispatcher right
before a send (quiet hours; suppression and consent are re-checked through routing).

**Frequency cap rule (exact).** For a marketing message to member M scheduled at time T by a
campaign with priority P, the *active* marketing rows of M are the outbox rows of other runs with
purpose marketing, ``scheduled_at`` in ``(T - window, T]`` and state planned, deferred, sending, sent or
unknown (messages sent, possibly sent, or still going to be sent). Then:

1. per-channel caps: a channel C with ``channel_caps[C] = k`` is dropped from the chain when M already
   has k active rows on C (the message may still go out on another channel of its chain);
2. the global cap: if M has fewer than ``marketing_cap`` active rows, the message is planned; otherwise,
   if enough of those rows are still *unsent* (planned or deferred) and belong to campaigns of strictly
   lower priority than P, the lowest-priority ones (latest scheduled first, on ties) are **preempted**
   (marked skipped with reason ``preempted``) and the new message takes their slot; otherwise the new
   message is skipped with reason ``frequency_cap``.

Messages already claimed by a dispatcher (sending), sent or unknown are never preempted, and equal
priority never preempts: on a tie, the campaign planned first keeps the slot. Transactional messages
neither count against nor are limited by marketing caps.

**Quiet hours.** For channels in ``quiet_hours.channels`` (default SMS and push; email is read when the
member chooses), a marketing message whose send time falls inside ``[start, end)`` in the member's own
timezone is deferred to the next ``end`` (not dropped). The window may wrap midnight (21:00-09:00).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import DeliveryPolicyRow, OutboxState
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose
from membercare.timeutil import UTC, utcnow


@dataclass(frozen=True)
class QuietHours:
    start: time = time(21, 0)
    end: time = time(9, 0)
    channels: frozenset[str] = frozenset({Channel.SMS.value, Channel.PUSH.value})

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ConfigurationError("quiet hours: start and end must differ (use quiet_hours=None to disable)")


@dataclass(frozen=True)
class PolicySettings:
    """Delivery policy knobs. Stored as JSON in ``delivery_policies`` (see :func:`load_policy`)."""

    marketing_cap: int | None = 3  # marketing messages per member per window, all channels; None = no cap
    cap_window_days: int = 7
    channel_caps: Mapping[str, int] = field(default_factory=dict)  # e.g. {"sms": 1}
    quiet_hours: QuietHours | None = field(default_factory=QuietHours)
    quiet_hours_for_transactional: bool = False  # an order-shipped SMS at 22:00 is expected, by default
    push_token_max_age_days: int = 90  # a token not seen for this long is not "live"
    fallback_timezone: str = "Asia/Taipei"  # for members whose stored zone is unknown

    @property
    def cap_window(self) -> timedelta:
        return timedelta(days=self.cap_window_days)

    def to_json(self) -> str:
        d = asdict(self)
        d["channel_caps"] = dict(self.channel_caps)
        if self.quiet_hours is not None:
            qh = self.quiet_hours
            d["quiet_hours"] = {"start": qh.start.strftime("%H:%M"), "end": qh.end.strftime("%H:%M"),
                                "channels": sorted(qh.channels)}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicySettings:
        d = json.loads(text)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(f"unknown delivery policy settings: {', '.join(sorted(unknown))}")
        qh = d.get("quiet_hours", "default")
        if qh == "default":
            d.pop("quiet_hours", None)
        elif qh is not None:
            d["quiet_hours"] = QuietHours(time.fromisoformat(qh["start"]), time.fromisoformat(qh["end"]),
                                          frozenset(qh.get("channels", ("sms", "push"))))
        for ch in d.get("channel_caps", {}):
            Channel(ch)
        return cls(**d)


def load_policy(conn: Connection, name: str = "default") -> PolicySettings:
    """The named settings from ``delivery_policies``; the built-in defaults when none are stored."""
    t = DeliveryPolicyRow.__table__
    text = conn.execute(sa.select(t.c.settings).where(t.c.name == name)).scalar()
    return PolicySettings.from_json(text) if text else PolicySettings()


def save_policy(conn: Connection, settings: PolicySettings, name: str = "default") -> None:
    from membercare.db import insert_for

    t = DeliveryPolicyRow.__table__
    ins = insert_for(conn, t)
    conn.execute(
        ins.on_conflict_do_update(index_elements=["name"],
                                  set_={"settings": ins.excluded.settings, "updated_at": ins.excluded.updated_at}),
        {"name": name, "settings": settings.to_json(), "updated_at": utcnow()},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Quiet hours


def member_zone(name: str | None, fallback: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or fallback)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo(fallback)


def quiet_hours_until(at: datetime, channel: str, purpose: str, zone: ZoneInfo,
                      settings: PolicySettings) -> datetime | None:
    """``None`` if a message may go out at ``at``; otherwise the UTC instant quiet hours end."""
    qh = settings.quiet_hours
    if qh is None or channel not in qh.channels:
        return None
    if purpose == Purpose.TRANSACTIONAL and not settings.quiet_hours_for_transactional:
        return None
    local = at.astimezone(zone)
    t = local.timetz().replace(tzinfo=None)
    wraps = qh.start > qh.end  # e.g. 21:00-09:00
    quiet = (t >= qh.start or t < qh.end) if wraps else (qh.start <= t < qh.end)
    if not quiet:
        return None
    end_day = local.date() + timedelta(days=1) if (wraps and t >= qh.start) else local.date()
    # Wall-clock end in the member's zone; a non-existent local time (DST gap) resolves forwards via UTC.
    end_local = datetime.combine(end_day, qh.end, zone)
    return end_local.astimezone(UTC)


# ---------------------------------------------------------------------------------------------------------------------
# Frequency caps


@dataclass(frozen=True)
class RecentMessage:
    """An active marketing outbox row of the member (see the module docstring)."""

    id: int
    campaign: str
    priority: int
    channel: str | None
    state: str
    scheduled_at: datetime


@dataclass(frozen=True)
class CapDecision:
    chain: tuple[str, ...]  # the chain that survives per-channel caps; empty when capped
    preempt: tuple[int, ...] = ()  # outbox ids to mark preempted for this message to take the slot
    capped: bool = False
    reason: str = ""
    # Rows the message counts against (for re-evaluating when a preemption loses a race).
    active: int = 0


_UNSENT = (OutboxState.PLANNED.value, OutboxState.DEFERRED.value)


def apply_frequency_cap(chain: Sequence[str], recent: Sequence[RecentMessage], *, priority: int,
                        settings: PolicySettings) -> CapDecision:
    """Apply per-channel caps and the global marketing cap (with priority preemption) to one message."""
    window = f"{settings.cap_window_days}d"
    dropped: list[str] = []
    kept: list[str] = []
    for ch in chain:
        cap = settings.channel_caps.get(ch)
        used = sum(1 for r in recent if r.channel == ch)
        if cap is not None and used >= cap:
            dropped.append(f"{ch} {used}/{cap} per {window}")
        else:
            kept.append(ch)
    if not kept:
        return CapDecision((), capped=True, active=len(recent),
                           reason=f"frequency cap: {'; '.join(dropped)}")
    note = f" (channel cap: {'; '.join(dropped)})" if dropped else ""
    cap = settings.marketing_cap
    if cap is None or len(recent) < cap:
        return CapDecision(tuple(kept), reason=note.strip(), active=len(recent))
    need = len(recent) - cap + 1
    victims = sorted(
        (r for r in recent if r.state in _UNSENT and r.priority < priority),
        key=lambda r: (r.priority, -r.scheduled_at.timestamp(), -r.id),
    )
    if len(victims) >= need:
        taken = victims[:need]
        names = ", ".join(sorted({r.campaign for r in taken}))
        return CapDecision(tuple(kept), preempt=tuple(r.id for r in taken), active=len(recent),
                           reason=f"took a frequency-cap slot from lower-priority {names}{note}")
    return CapDecision((), capped=True, active=len(recent),
                       reason=f"frequency cap: {len(recent)} marketing messages in {window} (cap {cap})")
