"""Signals: what happened that operations may want to react to, told to whoever listens.

The core says when a campaign run was planned or finished sending, when the error budget paused a run,
when a provider looks down, when a member unsubscribed, when journey steps fell due. It never imports an
orchestrator: ``flows/`` installs a sink that forwards every signal as a Prefect event
(``flows/signals.py``), and Prefect automations react to them (notify when a run pauses; start a
deployment on an event; examples in ``deploy/automations/``). Outside the flows nothing is installed and
signals are only logged at debug level.

A signal carries ids, counts and reasons, never personal data: its resource is an id such as
``membercare.run.42`` or ``membercare.member.1001``, and its payload holds scalars only (checked, strings
cut at 200 characters). Emission is best effort: a sink that fails is logged and never fails the work that
emitted the signal.

Extension point: implement :class:`SignalSink` (one method) and :func:`install` it for the process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

# The names, one per thing that happened (Prefect event names: dotted, past tense).
CAMPAIGN_PLANNED = "membercare.campaign.planned"
CAMPAIGN_DISPATCHED = "membercare.campaign.dispatched"
RUN_PAUSED = "membercare.run.paused"
PROVIDER_OUTAGE = "membercare.provider.outage"
MEMBER_UNSUBSCRIBED = "membercare.member.unsubscribed"
JOURNEY_STEPS_DUE = "membercare.journey.steps-due"
NAMES = (CAMPAIGN_PLANNED, CAMPAIGN_DISPATCHED, RUN_PAUSED, PROVIDER_OUTAGE, MEMBER_UNSUBSCRIBED, JOURNEY_STEPS_DUE)

Scalar = str | int | float | bool | None
_MAX_TEXT = 200


@dataclass(frozen=True)
class Signal:
    """One thing that happened. ``resource`` and ``related`` are ids (``membercare.<kind>.<id>``)."""

    name: str
    resource: str
    payload: Mapping[str, Scalar] = field(default_factory=dict)
    related: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith("membercare.") or not self.resource.startswith("membercare."):
            raise ValueError("signal names and resource ids start with 'membercare.'")
        clean: dict[str, Scalar] = {}
        for key, value in self.payload.items():
            if not isinstance(value, str | int | float | bool) and value is not None:
                raise TypeError(f"signal payload {key!r} must be a scalar, not {type(value).__name__}")
            clean[key] = value[:_MAX_TEXT] if isinstance(value, str) else value
        object.__setattr__(self, "payload", clean)


class SignalSink(Protocol):
    """Where signals go. ``emit`` must be quick and thread-safe (dispatcher threads call it)."""

    def emit(self, signal: Signal) -> None: ...


class MemorySink:
    """Keeps every signal in order: for tests and for a process that reports them itself."""

    def __init__(self) -> None:
        self.signals: list[Signal] = []
        self._lock = threading.Lock()

    def emit(self, signal: Signal) -> None:
        with self._lock:
            self.signals.append(signal)

    def named(self, name: str) -> list[Signal]:
        with self._lock:
            return [s for s in self.signals if s.name == name]


_sink: SignalSink | None = None
_sink_lock = threading.Lock()


def install(sink: SignalSink | None) -> SignalSink | None:
    """Make ``sink`` receive this process's signals (None: only log them); returns the previous sink."""
    global _sink
    with _sink_lock:
        previous, _sink = _sink, sink
    return previous


@contextmanager
def installed(sink: SignalSink | None) -> Iterator[SignalSink | None]:
    """:func:`install` for the duration of a ``with`` block, then put the previous sink back."""
    previous = install(sink)
    try:
        yield sink
    finally:
        install(previous)


def emit(name: str, resource: str, payload: Mapping[str, Scalar] | None = None, *,
         related: tuple[str, ...] = ()) -> None:
    """Tell the installed sink that ``name`` happened to ``resource``; never raises for the sink's sake."""
    signal = Signal(name, resource, payload or {}, related)
    sink = _sink
    if sink is None:
        log.debug("signal %s %s %s", name, resource, dict(signal.payload))
        return
    try:
        sink.emit(signal)
    except Exception as exc:  # noqa: BLE001 - a signal is best effort: the work that emitted it goes on
        log.warning("could not emit signal %s for %s (%s)", name, resource, type(exc).__name__)


def run_resource(run_id: int) -> str:
    return f"membercare.run.{run_id}"


def campaign_resource(campaign: str) -> str:
    return f"membercare.campaign.{campaign}"


def member_resource(member_id: int) -> str:
    return f"membercare.member.{member_id}"
