"""Dispatching a campaign occurrence: dispatcher passes over the run's outbox rows, and its progress.

:func:`dispatch_round` runs one pass of the dispatcher (:mod:`membercare.delivery.dispatcher`) in this
process: every due row is sent, and it returns when nothing is due (or the run stopped). The Prefect flow
repeats passes while retries fall due, or runs several dispatcher processes on the run
(:mod:`membercare.delivery.pool`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.delivery.contract import ChannelAdapter
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage, OutboxState
from membercare.delivery.reconcile import ProviderRecords
from membercare.models import Channel


@dataclass
class DispatchOutcome:
    """What dispatcher passes over a run did (counts only); passes merge into one outcome."""

    run_id: int
    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    status: str = ""
    stop_reason: str | None = None
    next_due_at: datetime | None = None
    recovered_unknown: int = 0
    elapsed: float = 0.0

    def merge(self, other: DispatchOutcome) -> DispatchOutcome:
        out = Counter(self.outcomes)
        out.update(other.outcomes)
        due = [d for d in (self.next_due_at, other.next_due_at) if d is not None]
        return DispatchOutcome(self.run_id or other.run_id, self.attempts + other.attempts, dict(out),
                               other.status or self.status, other.stop_reason or self.stop_reason,
                               min(due) if due else None, self.recovered_unknown + other.recovered_unknown,
                               max(self.elapsed, other.elapsed))


def dispatch_round(engine: Engine, run_id: int, adapters: Mapping[str, ChannelAdapter], *,
                   config: DispatchConfig | None = None, resume: bool = False,
                   limiters: Mapping[str, Any] | None = None, records: ProviderRecords | None = None,
                   worker_id: str | None = None) -> DispatchOutcome:
    """One dispatcher pass over the run: send every due row, return when nothing is due (or it stopped).

    ``limiters`` replaces the dispatcher's per-channel token buckets (e.g. limits shared between workers
    through the orchestrator); objects need ``acquire()``, ``reserve()`` and ``pause(seconds)``.
    Raises ``ConfigurationError`` (bad credentials) and ``RunPaused``; never per-message errors.
    """
    d = Dispatcher(engine, {str(Channel(k).value): v for k, v in adapters.items()}, config=config,
                   records=records, worker_id=worker_id)
    if limiters:
        d.use_limiters(limiters)
    rep = d.dispatch(run_id, resume=resume)
    return DispatchOutcome(run_id, rep.attempts, dict(rep.outcomes), rep.status, rep.stop_reason, rep.next_due_at,
                           rep.recovered_unknown, rep.elapsed)


def run_progress(engine: Engine, run_id: int) -> tuple[int, int]:
    """(settled, to send): rows no longer waiting to be sent vs rows that were meant to be sent."""
    o = OutboxMessage.__table__
    with engine.connect() as conn:
        counts = dict(conn.execute(sa.select(o.c.state, sa.func.count()).where(o.c.run_id == run_id)
                                   .group_by(o.c.state)).tuples().all())
    total = sum(n for s, n in counts.items() if s not in (OutboxState.SKIPPED.value, OutboxState.SUPPRESSED.value))
    waiting = sum(counts.get(s, 0) for s in (OutboxState.PLANNED.value, OutboxState.DEFERRED.value,
                                             OutboxState.SENDING.value))
    return total - waiting, total


__all__ = ["DispatchOutcome", "dispatch_round", "run_progress"]
