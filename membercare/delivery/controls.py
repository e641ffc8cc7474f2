"""Operator controls of one campaign run: pause, resume, cancel; and finding a run by id or name.

The send gate (:mod:`membercare.delivery.gate`) reads the run's status right before every provider call,
so a pause or cancel committed here stops every dispatcher of the run within one message per worker
thread: rows already claimed go back to ``planned`` without being attempted, calls in flight finish.

* **pause**: the run becomes ``paused`` with the reason ``paused by <who> at <when>: <why>`` and no
  automatic resumption (``auto_resume_at`` cleared), so neither the scheduled ``dispatch-due`` flow nor a
  rerun of the occurrence sends anything until it is resumed.
* **resume**: a paused run goes back to ``planned`` (``resumed by <who> at <when>``); the next dispatcher
  pass (``dispatch-due``, ``membercare campaign resume --send``, or the rerun flow) sends what is left,
  each row exactly once (the ledger's states, not the orchestrator, guarantee it).
* **cancel**: the run becomes ``cancelled`` (a final status: ``cancelled by <who> at <when>: <why>``),
  then every row still waiting (``planned``/``deferred``) is settled ``skipped`` with reason code
  ``cancelled``. A cancelled run is never resumed, paused or dispatched again (:func:`resume_run`, the
  dispatcher's start and ``dispatch-due`` refuse it). Rows a dispatcher hands back after the cancel (those
  between their claim and the gate) are settled when that dispatcher's pass ends (see
  :func:`membercare.delivery.dispatch_run.finish_run`), and by a second sweep here once no row is
  ``sending``; :func:`cancel_run` is idempotent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.dispatch_run import skip_cancelled
from membercare.delivery.models import (
    CampaignRun,
    Decision,
    OutboxMessage,
    OutboxState,
    RunStatus,
)
from membercare.delivery.planner import refresh_run_counts
from membercare.errors import InputError, UnknownNameError
from membercare.timeutil import utcnow

CANCELLED = Decision.CANCELLED.value


@dataclass(frozen=True)
class RunInfo:
    """A run as an operator sees it (no personal data)."""

    id: int
    campaign: str
    occurrence: str
    status: str
    reason: str | None
    counts: dict[str, int]

    @property
    def cancelled(self) -> bool:
        return is_cancelled(self.status, self.reason)

    @property
    def label(self) -> str:
        return f"run {self.id} ({self.campaign}/{self.occurrence})"


def is_cancelled(status: str | None, reason: str | None = None) -> bool:
    """Whether a run with this status was cancelled (``reason`` is accepted for older callers)."""
    return status == RunStatus.CANCELLED.value


def find_run(engine: Engine, ref: str | int) -> RunInfo:
    """The run named by ``ref``: its id, ``campaign/occurrence``, or a campaign name (its newest run)."""
    r = CampaignRun.__table__
    text = str(ref).strip()
    if text.isdigit():
        cond = r.c.id == int(text)
    elif "/" in text:
        campaign, _, occurrence = text.partition("/")
        cond = sa.and_(r.c.campaign == campaign, r.c.occurrence == occurrence)
    else:
        cond = r.c.campaign == text
    with engine.connect() as conn:
        row = conn.execute(sa.select(r).where(cond).order_by(r.c.created_at.desc(), r.c.id.desc()).limit(1)).first()
        if row is None:
            recent = conn.execute(sa.select(r.c.id, r.c.campaign, r.c.occurrence)
                                  .order_by(r.c.id.desc()).limit(10)).all()
            raise UnknownNameError("campaign run", text, [f"{x.id} ({x.campaign}/{x.occurrence})" for x in recent])
        counts = _counts(conn, int(row.id))
    return RunInfo(int(row.id), row.campaign, row.occurrence, row.status, row.status_reason, counts)


def list_runs(engine: Engine, *, limit: int = 20) -> list[RunInfo]:
    """The newest runs, newest first."""
    r = CampaignRun.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(r).order_by(r.c.id.desc()).limit(limit)).all()
        return [RunInfo(int(x.id), x.campaign, x.occurrence, x.status, x.status_reason, _counts(conn, int(x.id)))
                for x in rows]


def _counts(conn: Connection, run_id: int) -> dict[str, int]:
    o = OutboxMessage.__table__
    return {s: int(n) for s, n in conn.execute(
        sa.select(o.c.state, sa.func.count()).where(o.c.run_id == run_id).group_by(o.c.state))}


def _stamp(verb: str, by: str | None, now: datetime, reason: str | None) -> str:
    who = f" by {by}" if by else ""
    return f"{verb}{who} at {now.isoformat(timespec='seconds')}" + (f": {reason}" if reason else "")


def pause_run(engine: Engine, ref: str | int, *, reason: str | None = None, by: str | None = None,
              now: datetime | None = None) -> RunInfo:
    """Pause a run that has not finished; the send gate stops its dispatchers before their next call."""
    run = find_run(engine, ref)
    if run.cancelled:
        raise InputError(f"{run.label} was cancelled ({run.reason}); there is nothing to pause")
    if run.status == RunStatus.COMPLETED.value:
        raise InputError(f"{run.label} is completed: nothing is left to send")
    now = now or utcnow()
    why = _stamp("paused", by, now, reason or "operator pause")
    r = CampaignRun.__table__
    in_transaction(engine, lambda conn: conn.execute(sa.update(r).where(
        r.c.id == run.id, r.c.status != RunStatus.CANCELLED.value).values(
        status=RunStatus.PAUSED.value, status_reason=why[:500], auto_resume_at=None, updated_at=now)))
    return find_run(engine, run.id)


def resume_run(engine: Engine, ref: str | int, *, by: str | None = None, now: datetime | None = None,
               reason: str | None = None) -> RunInfo:
    """Put a paused run back to ``planned``: the next dispatcher pass sends what is left (each row once)."""
    run = find_run(engine, ref)
    if run.cancelled:
        raise InputError(f"{run.label} was cancelled ({run.reason}); a cancelled run is never resumed")
    if run.status != RunStatus.PAUSED.value:
        raise InputError(f"{run.label} is {run.status}, not paused")
    now = now or utcnow()
    r = CampaignRun.__table__
    in_transaction(engine, lambda conn: conn.execute(
        sa.update(r).where(r.c.id == run.id, r.c.status == RunStatus.PAUSED.value).values(
            status=RunStatus.PLANNED.value, status_reason=_stamp("resumed", by, now, reason)[:500],
            auto_resume_at=None, updated_at=now)))
    return find_run(engine, run.id)


def cancel_run(engine: Engine, ref: str | int, *, reason: str | None = None, by: str | None = None,
               now: datetime | None = None, settle_wait_s: float = 10.0) -> RunInfo:
    """Stop a run for good: status ``cancelled``, every waiting row settled ``skipped`` (``cancelled``).

    Waits up to ``settle_wait_s`` for rows in flight (``sending``) to be answered or released by the send
    gate, then settles what they left waiting; rows still ``sending`` after that belong to a dead dispatcher
    and are handed back by crash recovery, after which cancelling again settles them.
    """
    run = find_run(engine, ref)
    if run.status == RunStatus.COMPLETED.value:
        raise InputError(f"{run.label} is completed: nothing is left to cancel")
    now = now or utcnow()
    why = run.reason if run.cancelled else _stamp(CANCELLED, by, now, reason or "operator cancel")
    r = CampaignRun.__table__
    in_transaction(engine, lambda conn: conn.execute(sa.update(r).where(
        r.c.id == run.id, r.c.status != RunStatus.COMPLETED.value).values(
        status=RunStatus.CANCELLED.value, status_reason=(why or CANCELLED)[:500], auto_resume_at=None,
        updated_at=now)))
    _skip_waiting(engine, run.id, now)
    deadline = time.monotonic() + settle_wait_s
    while _sending(engine, run.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    _skip_waiting(engine, run.id, now)
    return find_run(engine, run.id)


def _skip_waiting(engine: Engine, run_id: int, now: datetime) -> None:
    def work(conn: Connection) -> None:
        skip_cancelled(conn, run_id, now)
        refresh_run_counts(conn, run_id)

    in_transaction(engine, work)


def _sending(engine: Engine, run_id: int) -> int:
    o = OutboxMessage.__table__
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(
            o.c.run_id == run_id, o.c.state == OutboxState.SENDING.value)).scalar_one())


__all__ = ["CANCELLED", "RunInfo", "cancel_run", "find_run", "is_cancelled", "list_runs", "pause_run",
           "resume_run"]
