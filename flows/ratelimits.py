"""Provider rate limits shared by every worker, through Prefect global concurrency limits.

Each provider allows a sustained rate per account or sender (Twilio's per-number rate, SendGrid's per-key
rate, FCM's per-project quota). When several workers dispatch at once, a per-process token bucket would
multiply that rate by the number of workers. So each channel has a Prefect **global concurrency limit**
used as a rate limit: ``limit`` = the burst, ``slot_decay_per_second`` = the sustained rate (messages/s).
Names: ``membercare-email``, ``membercare-sms``, ``membercare-push``. ``membercare setup-blocks`` creates
them from ``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` (messages/s; defaults below).

:class:`SharedRateLimiter` plugs into the dispatcher in place of its local token bucket. Asking the
Prefect API for every single message would cost a round trip per message, so it takes slots in small
chunks (about a tenth of a second's worth, never more than the burst) and hands them out locally; the
limit still holds across workers because every chunk is taken from the shared limit.

``rate_limit(..., strict=True)`` is used throughout: without ``strict`` Prefect silently does nothing when
the named limit does not exist. :func:`shared_limiters` checks once per flow run which limits exist; a
channel without one is limited in each dispatcher process to ``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` (or the
default in :data:`membercare.delivery.ratelimit.DEFAULT_RATES`), and the flow logs a warning saying so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from membercare.delivery.ratelimit import DEFAULT_RATES, configured_rates
from membercare.models import Channel

log = logging.getLogger("membercare.flows")

PREFIX = "membercare-"


def limit_name(channel: Channel | str) -> str:
    return PREFIX + Channel(channel).value


def burst_for(rate: float) -> int:
    """Slots of the global limit: a tenth of a second's worth (at least 1), as the local token bucket's burst.

    The limit admits at most ``rate x T + slots`` messages in any window of T seconds, whichever worker
    sends them: with a second's worth of slots one second could carry twice the provider's rate."""
    return max(1, int(round(rate / 10)))


def ensure_limits(rates: Mapping[str, float]) -> list[str]:
    """Create or update the global concurrency limits (``setup-blocks``, and the demo). Returns their names."""
    from prefect import get_client

    names = []
    with get_client(sync_client=True) as client:
        for ch, rate in rates.items():
            name = limit_name(ch)
            client.upsert_global_concurrency_limit_by_name(name, burst_for(rate), slot_decay_per_second=float(rate))
            names.append(name)
    return names


class SharedRateLimiter:
    """The dispatcher's limiter interface (``acquire``, ``reserve``, ``pause``) over a global limit."""

    def __init__(self, name: str, *, limit: int, rate: float):
        self.name = name
        self.rate = float(rate)
        # Chunk: about 0.1 s worth of slots, at most the limit (a chunk larger than the limit never fits).
        self.chunk = max(1, min(int(limit), int(round(self.rate / 10)) or 1))
        self._tokens = 0
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def _take_chunk(self) -> None:
        from prefect.concurrency.sync import rate_limit

        rate_limit(self.name, occupy=self.chunk, strict=True)
        self._tokens += self.chunk

    def acquire(self) -> float:
        started = time.monotonic()
        with self._lock:  # threads queue here; the one holding the lock refills for everyone
            wait = self._paused_until - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if self._tokens <= 0:
                self._take_chunk()
            self._tokens -= 1
        return time.monotonic() - started

    def reserve(self) -> float:
        # The dispatcher only uses reserve() through acquire(); waiting happens inside acquire here.
        return 0.0

    def pause(self, seconds: float) -> None:
        """A provider said Retry-After: stop this worker's sends for that long and drop unspent slots."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + max(0.0, seconds))
            self._tokens = 0


def shared_limiters(channels: Iterable[Channel | str]) -> tuple[dict[str, SharedRateLimiter], list[str]]:
    """Limiters for the channels whose global limit exists and is active; and the channels without one."""
    from prefect import get_client

    found: dict[str, SharedRateLimiter] = {}
    missing: list[str] = []
    with get_client(sync_client=True) as client:
        for ch in channels:
            ch = Channel(ch).value
            try:
                gcl = client.read_global_concurrency_limit_by_name(limit_name(ch))
            except Exception:  # noqa: BLE001 - ObjectNotFound (or an older server): treat as absent
                gcl = None
            if gcl is None or not gcl.active or not gcl.slot_decay_per_second:
                missing.append(ch)
                continue
            found[ch] = SharedRateLimiter(gcl.name, limit=gcl.limit, rate=gcl.slot_decay_per_second)
    return found, missing


__all__ = ["DEFAULT_RATES", "PREFIX", "SharedRateLimiter", "burst_for", "configured_rates", "ensure_limits",
           "limit_name", "shared_limiters"]
