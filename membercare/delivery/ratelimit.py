"""A thread-safe token bucket per provider, with back-pressure from 429 ``Retry-After`` answers.

Each provider publishes a sustained rate (SendGrid per API key, Twilio per sender number or messaging
service, FCM per project); the dispatcher's worker threads call :meth:`TokenBucket.acquire` before
every request. Reservations are made under a lock and the waiting is done outside it, so threads
queue fairly in arrival order without holding the lock while they sleep. When a provider throttles us
anyway, :meth:`TokenBucket.pause` stops the bucket for the ``Retry-After`` period, so the other
threads back off too instead of each collecting its own 429.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from membercare.errors import ConfigurationError
from membercare.models import Channel

# Sustained messages/s per channel when MEMBERCARE_RATE_LIMIT_<CHANNEL> is not set: conservative defaults that
# match a single Twilio long-code sender's order of magnitude and typical SendGrid/FCM account limits.
# LINE: the Messaging API allows 2,000 push requests/s per channel; 100/s leaves room for the shop's own bot.
DEFAULT_RATES: dict[str, float] = {"email": 100.0, "sms": 10.0, "push": 200.0, "line": 100.0}


def configured_rates(env: Mapping[str, str]) -> dict[str, float]:
    """Messages/s per channel from ``MEMBERCARE_RATE_LIMIT_EMAIL`` / ``_SMS`` / ``_PUSH`` (else the defaults).

    These hold in every mode: shared by all workers through the orchestrator's global limits when those
    exist, else applied by each dispatcher (split between the processes of one dispatch)."""
    out = {}
    for ch in Channel:
        var = f"MEMBERCARE_RATE_LIMIT_{ch.value.upper()}"
        raw = (env.get(var) or "").strip()
        try:
            rate = float(raw) if raw else DEFAULT_RATES[ch.value]
        except ValueError:
            raise ConfigurationError(f"{var} must be messages per second, not {raw[:20]!r}") from None
        if not rate > 0 or rate == float("inf"):
            raise ConfigurationError(f"{var} must be a positive number of messages per second")
        out[ch.value] = rate
    return out


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive (messages per second)")
        self.rate = float(rate)
        # Default burst: a tenth of a second's worth (at least one), so a fresh bucket cannot stampede.
        self.burst = float(burst if burst is not None else max(1.0, rate / 10))
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take one token (possibly on credit) and return how long the caller must wait before using it."""
        with self._lock:
            now = self._clock()
            start = max(now, self._paused_until)
            # Refill up to the start instant; tokens may go negative (a queue of reservations).
            self._tokens = min(self.burst, self._tokens + (start - self._last) * self.rate)
            self._last = start
            self._tokens -= 1.0
            wait = start - now
            if self._tokens < 0:
                wait += -self._tokens / self.rate
            return wait

    def acquire(self) -> float:
        """Block until a message may be sent; returns the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait

    def pause(self, seconds: float) -> None:
        """Stop handing out tokens for ``seconds`` (a provider said Retry-After) and drop the saved burst."""
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            if until > self._paused_until:
                self._paused_until = until
                self._tokens = min(self._tokens, 0.0)


class Unlimited:
    """The no-op limiter for channels without a configured rate."""

    def reserve(self) -> float:
        return 0.0

    def acquire(self) -> float:
        return 0.0

    def pause(self, seconds: float) -> None:
        return None
