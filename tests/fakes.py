"""In-process test doubles for exercising planning and dispatch without providers (tests and benchmarks).

Not part of the product: tests import them as ``fakes``; the bench scripts put ``tests/`` on their path.

:class:`FakeAdapter` implements :class:`~membercare.delivery.contract.ChannelAdapter`; it records every
accepted message (optionally appending one line per acceptance to a file, for crash tests that kill
the process) and can be scripted per call or per address. :func:`simple_renderer` renders fixed
content; :func:`seed_members` writes members with consents and devices.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.consent import ConsentStatement, record_consents
from membercare.delivery.contract import (
    Accepted,
    EmailContent,
    OutboundMessage,
    PushContent,
    SendResult,
    SmsContent,
)
from membercare.models import Channel, Device, Member
from membercare.timeutil import ensure_utc

Script = Callable[[OutboundMessage, int], SendResult | None]


class FakeAdapter:
    """A thread-safe fake provider. ``script(message, call_number)`` may return a result (or raise);
    ``None`` means accept. ``record_path`` gets ``message_id idempotency_key`` per acceptance, written
    with a single ``O_APPEND`` write so that a killed process never leaves a torn line."""

    def __init__(self, channel: Channel | str, script: Script | None = None, *, latency: float = 0.0,
                 record_path: str | None = None):
        self.channel = Channel(channel)
        self.script, self.latency, self.record_path = script, latency, record_path
        self.accepted: list[OutboundMessage] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if record_path else None

    def send(self, message: OutboundMessage) -> SendResult:
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.latency:
            time.sleep(self.latency)
        result = self.script(message, n) if self.script else None
        if result is None or isinstance(result, Accepted):
            pid = result.provider_message_id if result else f"{self.channel.value}-{message.message_id}"
            if self._fd is not None:
                os.write(self._fd, f"{message.message_id} {message.idempotency_key} {pid}\n".encode())
            with self._lock:
                self.accepted.append(message)
            return result or Accepted(pid, 202)
        return result

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def simple_renderer(request) -> EmailContent | SmsContent | PushContent:
    """Deterministic content naming the campaign and member (no templates)."""
    name = request.member.get("name", "member") if request.member else "member"
    if request.channel == Channel.EMAIL:
        return EmailContent(subject=f"{request.campaign} for {name}", html=f"<p>Hello {name}</p>",
                            text=f"Hello {name}")
    if request.channel == Channel.SMS:
        return SmsContent(body=f"{request.campaign}: hello {name}", encoding="GSM-7", segments=1)
    return PushContent(title=request.campaign, body=f"Hello {name}", data={"campaign": request.campaign})


def seed_members(conn: Connection, n: int, *, start: int | None = None, preferred: str = "email,sms,push",
                 consent: Sequence[tuple[str, str]] = (("email", "marketing"), ("sms", "marketing"),
                                                       ("push", "marketing")),
                 push: bool = True, timezone: str = "Asia/Taipei", now: datetime) -> list[int]:
    """Insert ``n`` members with the given consents and (optionally) one live push token each; returns ids.

    ``now`` is required: members join 100 days before it and consent the day before it, so a caller
    that plans or revokes at fixed dates must seed at the same clock (the real one would make the
    seeded consent newer than a fixed revocation as the calendar moves on).
    """
    now = ensure_utc(now)
    m = Member.__table__
    if start is None:  # continue after the members already there
        start = conn.execute(sa.select(sa.func.count()).select_from(m)).scalar_one()
    rows = [dict(external_id=f"M{start + i:07d}", name=f"Member {start + i}", email=f"m{start + i}@example.test",
                 phone=f"+8869{(start + i) % 100_000_000:08d}", country="TW", locale="zh-TW", timezone=timezone,
                 joined_at=now - timedelta(days=100), tier="silver", points_balance=0, preferred_channels=preferred,
                 created_at=now, updated_at=now) for i in range(n)]
    ids = list(conn.execute(sa.insert(m).returning(m.c.id), rows).scalars()) if rows else []
    ids.sort()
    stmts = [ConsentStatement(mid, ch, purpose, True, "import", now - timedelta(days=1))
             for mid in ids for ch, purpose in consent]
    for i in range(0, len(stmts), 5000):
        record_consents(conn, stmts[i : i + 5000])
    if push and ids:
        conn.execute(sa.insert(Device.__table__), [
            dict(member_id=mid, token=f"tok-{mid}-{'x' * 20}", platform="android", app_id="shop",
                 created_at=now, last_seen_at=now - timedelta(days=1)) for mid in ids])
    return ids


__all__ = ["FakeAdapter", "simple_renderer", "seed_members"]
