"""The part of the request pipeline every provider call shares: latency, the fault draw (5xx, timeout, dropped
connection, ghost) and the rate limit (429 + Retry-After), before the provider's own validation.

Faults other than "ghost" happen *before* acceptance, so a retried fault can never create a duplicate by
itself. The draw is seeded by the request body and how often that body was seen, so a run replays exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import NamedTuple, NoReturn

from aiohttp import web

from membercare.sandbox.config import SandboxConfig
from membercare.sandbox.state import SandboxState, TokenBucket, seeded_rng


class Fault(NamedTuple):
    """Answer with this instead of going on: ``("error", 500|503)``, ``("timeout", 504)`` or
    ``("throttled", seconds to wait)``."""

    kind: str
    value: int


class Ghost:
    """Accept the message, then drop the connection instead of answering (the client never learns)."""


GHOST = Ghost()


async def gate(request: web.Request, channel: str, raw: bytes, config: SandboxConfig,
               state: SandboxState) -> Fault | Ghost | None:
    """Latency, faults and rate limit of one call on ``channel``. Returns None to go on, :data:`GHOST` to
    accept-then-drop, or a :class:`Fault` to answer instead (a dropped connection does not return)."""
    b = config.behaviour(channel)
    if b.latency_ms or b.latency_jitter_ms:
        delay = b.latency_ms
        if b.latency_jitter_ms:
            delay += seeded_rng(config.seed, "jitter", raw, time.monotonic_ns()).random() * b.latency_jitter_ms
        await asyncio.sleep(delay / 1000)
    ghost: Ghost | None = None
    if b.error_rate or b.timeout_rate or b.drop_rate or b.ghost_rate:
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        attempt = state.attempts[digest]
        state.attempts[digest] = attempt + 1
        rng = seeded_rng(config.seed, "fault", channel, digest, attempt)
        draw = rng.random()
        faults = state.stats.faults[channel]
        if draw < b.error_rate:
            faults["error"] += 1
            return Fault("error", 503 if rng.random() < 0.5 else 500)
        draw -= b.error_rate
        if draw < b.timeout_rate:
            faults["timeout"] += 1
            await _hold(request, config.timeout_hold_s)
            return Fault("timeout", 504)
        draw -= b.timeout_rate
        if draw < b.drop_rate:
            faults["drop"] += 1
            drop(request)
        draw -= b.drop_rate
        if draw < b.ghost_rate:
            faults["ghost"] += 1
            ghost = GHOST
    if b.rate_limit:
        bucket = state.buckets.get(channel)
        capacity = b.burst or max(1.0, b.rate_limit)
        if bucket is None or bucket.rate != b.rate_limit or bucket.capacity != capacity:
            bucket = state.buckets[channel] = TokenBucket(b.rate_limit, capacity)
        wait = bucket.take()
        if wait > 0:
            state.stats.throttled[channel] += 1
            return Fault("throttled", max(1, math.ceil(wait)))
    return ghost


async def _hold(request: web.Request, seconds: float) -> None:
    """Keep the request open past the client's timeout (stop early once the client gave up)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        await asyncio.sleep(0.05)


def drop(request: web.Request) -> NoReturn:
    """Abort the connection: aiohttp ends the request quietly, and the client sees a reset."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError
