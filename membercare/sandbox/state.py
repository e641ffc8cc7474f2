"""The sandbox's memory: accepted messages, counters, rate-limit buckets and provider-side recipient state.

Everything here is touched only from the server's event loop thread, so it needs no locks.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from membercare.delivery.contract import redact


def seeded_rng(seed: int, *parts: object) -> random.Random:
    """A generator that depends only on the seed and ``parts``: outcomes per message do not depend on the
    order in which concurrent requests happen to arrive."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def stable_id(seed: int, *parts: object, length: int = 32) -> str:
    return hashlib.blake2b(repr((seed, *parts)).encode("utf-8"), digest_size=length // 2).hexdigest()


@dataclass
class MessageRecord:
    """One accepted message (one recipient)."""

    seq: int
    channel: str
    provider_id: str
    message_id: str | None
    idempotency_key: str | None
    to: str  # full address: kept in memory for simulated recipients, redacted in the JSON record
    accepted_at: float
    account: str | None = None  # SendGrid key fingerprint, Twilio AccountSid, FCM project
    ghost: bool = False  # accepted but the answer was dropped
    attributes: dict[str, str] = field(default_factory=dict)  # for the engagement model
    extra: dict[str, Any] = field(default_factory=dict)  # provider bits the recipients need (from, callback)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "channel": self.channel,
            "provider_id": self.provider_id,
            "message_id": self.message_id,
            "idempotency_key": self.idempotency_key,
            "to": redact(self.to),
            "account": self.account,
            "ghost": self.ghost,
            "accepted_at": datetime.fromtimestamp(self.accepted_at, UTC).isoformat().replace("+00:00", "Z"),
        }


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` banked."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = capacity, time.monotonic()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)  # per channel
    accepted: Counter = field(default_factory=Counter)
    duplicates_by_message_id: Counter = field(default_factory=Counter)
    duplicates_by_idempotency_key: Counter = field(default_factory=Counter)
    rejected: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # channel -> reason
    throttled: Counter = field(default_factory=Counter)
    faults: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # channel -> kind
    webhooks: Counter = field(default_factory=Counter)  # "<kind>.posted" / ".failed_attempts" / ".gave_up"
    events: Counter = field(default_factory=Counter)  # "<channel>.<event>"
    lookups: Counter = field(default_factory=Counter)  # provider list calls (e.g. Twilio's Messages list), per channel

    def to_json(self, pending_webhooks: int) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "accepted": dict(self.accepted),
            "accepted_total": sum(self.accepted.values()),
            "duplicates_by_message_id": dict(self.duplicates_by_message_id),
            "duplicates_by_message_id_total": sum(self.duplicates_by_message_id.values()),
            "duplicates_by_idempotency_key": dict(self.duplicates_by_idempotency_key),
            "duplicates_by_idempotency_key_total": sum(self.duplicates_by_idempotency_key.values()),
            "rejected": {ch: dict(c) for ch, c in self.rejected.items()},
            "rejected_total": sum(sum(c.values()) for c in self.rejected.values()),
            "throttled": dict(self.throttled),
            "faults": {ch: dict(c) for ch, c in self.faults.items()},
            "webhooks": dict(self.webhooks),
            "events": dict(self.events),
            "lookups": dict(self.lookups),
            "pending_webhooks": pending_webhooks,
        }


class SandboxState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seq = 0
        self.records: list[MessageRecord] = []
        self.sms_by_to: dict[str, list[MessageRecord]] = defaultdict(list)  # Twilio's list filters by recipient
        self.stats = Stats()
        self.seen_message_ids: dict[str, set[str]] = defaultdict(set)  # channel -> ids
        self.seen_keys: dict[str, set[str]] = defaultdict(set)
        self.attempts: Counter = Counter()  # request-body digest -> how often seen (deterministic faults)
        self.buckets: dict[str, TokenBucket] = {}
        self.captured: deque[dict[str, Any]] = deque()
        self.opted_out: set[str] = set()  # numbers that replied STOP during this run
        self.unregistered: set[str] = set()  # tokens whose app was uninstalled during this run
        self.bounced: set[str] = set()  # addresses that hard-bounced: SendGrid drops later sends
        self.unsubscribed: set[str] = set()
        self.fcm_access_tokens: dict[str, str] = {}  # access token -> service account email

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def record(self, rec: MessageRecord) -> None:
        self.records.append(rec)
        if rec.channel == "sms":
            self.sms_by_to[rec.to].append(rec)
        self.stats.accepted[rec.channel] += 1
        if rec.message_id:
            seen = self.seen_message_ids[rec.channel]
            if rec.message_id in seen:
                self.stats.duplicates_by_message_id[rec.channel] += 1
            else:
                seen.add(rec.message_id)
        if rec.idempotency_key:
            seen = self.seen_keys[rec.channel]
            if rec.idempotency_key in seen:
                self.stats.duplicates_by_idempotency_key[rec.channel] += 1
            else:
                seen.add(rec.idempotency_key)

    def capture(self, limit: int, entry: dict[str, Any]) -> None:
        if limit <= 0:
            return
        self.captured.append(entry)
        while len(self.captured) > limit:
            self.captured.popleft()
