"""The operator's rate limits hold in every mode, measured on the provider's side (the sandbox's accepted times).

Without a Prefect global concurrency limit (the local default) each dispatcher applies
``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` or the documented default itself; with several dispatcher processes the
rate is split between them. These tests measure real sends through the real Twilio SDK: they take a few
seconds by nature (a rate is a rate), and assert with the token bucket's exact bound (rate x window + burst).
"""
from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from fakes import FakeAdapter, seed_members, simple_renderer
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.delivery.ratelimit import DEFAULT_RATES, configured_rates
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose
from sandbox_fixtures import *  # noqa: F403

NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)
QUIET = {"engagement": {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")},
         "webhook_max_attempts": 1}


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window + 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_configured_rates_come_from_the_environment_with_documented_defaults():
    assert configured_rates({}) == DEFAULT_RATES
    assert configured_rates({"MEMBERCARE_RATE_LIMIT_SMS": "4"})["sms"] == 4.0
    for bad in ("fast", "0", "-1", "inf"):
        with pytest.raises(ConfigurationError, match="MEMBERCARE_RATE_LIMIT_SMS"):
            configured_rates({"MEMBERCARE_RATE_LIMIT_SMS": bad})


def test_the_flow_limits_channels_without_a_global_limit_itself(monkeypatch):
    from flows.campaign import local_rate_config

    monkeypatch.setenv("MEMBERCARE_RATE_LIMIT_SMS", "4")
    monkeypatch.setenv("MEMBERCARE_NO_SECRET_BLOCKS", "1")
    cfg = local_rate_config({"sms": object(), "email": object()}, {})
    assert cfg.rate_limits == {"sms": 4.0, "email": DEFAULT_RATES["email"]}
    # A channel whose rate is shared through the orchestrator is not limited twice.
    assert local_rate_config({"sms": object(), "email": object()}, {"sms": object()}).rate_limits == {
        "email": DEFAULT_RATES["email"]}


@pytest.mark.slow  # 70 messages at 20/s: seconds of real pacing on each backend
def test_sms_rate_limit_holds_at_the_provider(engine, sandbox, adapters):
    sandbox.configure(**QUIET)
    rate, n = 20.0, 70
    now = datetime.now(UTC)  # the sandbox stamps real times: read the real clock once, use it everywhere
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred="sms", consent=[("sms", "marketing")], now=now)
    run_id = plan_run(engine, PlanSpec("rl", "2026-11-23", Purpose.MARKETING, (Channel.SMS,)), [ids],
                      now, simple_renderer, policy=NOPOLICY).run_id
    cfg = DispatchConfig(workers=16, batch_size=50, rate_limits={"sms": rate}, flush_interval=0.05)
    burst = max(1.0, rate / 10)
    rep = Dispatcher(engine, adapters, config=cfg, policy=NOPOLICY).dispatch(run_id)
    assert rep.outcomes["sent"] == n
    times = [datetime.fromisoformat(m["accepted_at"]).timestamp() for m in sandbox.messages()
             if m["channel"] == "sms"]
    assert len(times) == n
    # A token bucket admits at most rate x T + burst in any window T. The sandbox stamps acceptance after the
    # request crossed the loopback and its event loop, which can bunch requests sent apart by up to a few
    # hundred milliseconds on a busy machine: allow that jitter (0.25 s worth of tokens) on top.
    assert max_in_window(times, 1.0) <= rate * (1.0 + 0.25) + burst
    assert max(times) - min(times) >= (n - burst) / rate * 0.9


class _StallingDispatcher(Dispatcher):
    """The send gate stalls once for ``stall`` seconds (a database busy with a vacuum or a lock)."""

    stall, stall_at = 0.6, 12

    def _gate_batch(self, jobs):
        self.gate_calls = getattr(self, "gate_calls", 0) + 1
        if self.gate_calls == self.stall_at:
            time.sleep(self.stall)
        return super()._gate_batch(jobs)


@pytest.mark.slow  # 60 messages at 20/s: seconds of real pacing
def test_a_stalled_gate_does_not_release_a_burst(engine, clock):
    # Threads that took their tokens while the gate was held leave it together; the calls must still keep
    # the rate. Measured at the adapter (the moment of the provider call), so no loopback jitter is involved.
    rate, n = 20.0, 60
    sent_at: list[float] = []

    def record(message, call):
        sent_at.append(time.monotonic())

    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred="sms", consent=[("sms", "marketing")], now=clock())
    run_id = plan_run(engine, PlanSpec("stall", "2026-11-23", Purpose.MARKETING, (Channel.SMS,)), [ids],
                      clock(), simple_renderer, policy=NOPOLICY).run_id
    cfg = DispatchConfig(workers=16, batch_size=60, rate_limits={"sms": rate}, flush_interval=0.05)
    burst = max(1.0, rate / 10)
    d = _StallingDispatcher(engine, {"sms": FakeAdapter("sms", record)}, config=cfg, policy=NOPOLICY,
                            clock=clock)
    rep = d.dispatch(run_id)
    assert rep.outcomes["sent"] == n and len(sent_at) == n
    assert d.gate_calls > d.stall_at  # the stall happened mid-run
    # The bucket's bound (rate x T + burst), plus one call of scheduling jitter and 10 % for thread wake-ups.
    assert max_in_window(sent_at, 1.0) <= rate * 1.1 + burst + 1


class _ChunkLimiter:
    """A limiter that hands out slots a chunk at a time, as a limit shared between workers does: the first
    caller of each chunk waits for it, the rest of the chunk is free. Here a whole second's worth per chunk."""

    def __init__(self, rate: float):
        self.rate, self.chunk = rate, int(rate)
        self._tokens, self._next = 0, time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        with self._lock:
            if self._tokens <= 0:
                time.sleep(max(0.0, self._next - time.monotonic()))
                self._next = time.monotonic() + self.chunk / self.rate
                self._tokens = self.chunk
            self._tokens -= 1
        return 0.0

    def reserve(self) -> float:
        return 0.0

    def pause(self, seconds: float) -> None:
        self._tokens = 0


@pytest.mark.slow  # 60 messages at 20/s: seconds of real pacing
def test_a_chunked_shared_limiter_is_paced_after_the_gate(engine, clock):
    rate, n = 20.0, 60
    sent_at: list[float] = []
    with engine.begin() as conn:
        ids = seed_members(conn, n, preferred="sms", consent=[("sms", "marketing")], now=clock())
    run_id = plan_run(engine, PlanSpec("chunk", "2026-11-23", Purpose.MARKETING, (Channel.SMS,)), [ids],
                      clock(), simple_renderer, policy=NOPOLICY).run_id
    # No local rate for SMS: the shared limiter is the only one, as on a stack with global limits.
    cfg = DispatchConfig(workers=16, batch_size=60, rate_limits={}, flush_interval=0.05)
    d = Dispatcher(engine, {"sms": FakeAdapter("sms", lambda m, c: sent_at.append(time.monotonic()))},
                   config=cfg, policy=NOPOLICY, clock=clock)
    d.use_limiters({"sms": _ChunkLimiter(rate)})
    rep = d.dispatch(run_id)
    assert rep.outcomes["sent"] == n and len(sent_at) == n
    # Without the pacer each chunk (20 slots) leaves at once: 20 calls within a few milliseconds.
    burst = max(1.0, rate / 10)
    assert max_in_window(sent_at, 0.25) <= rate * 0.25 * 1.1 + burst + 1
