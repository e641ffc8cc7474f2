"""The run's state as a dispatcher moves it: started (or resumed), paused, finished.

Each change is one short transaction that starts with a write on the run's row
(:func:`take_write_lock`), so concurrent dispatchers on one run serialise their few run-level updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction
from membercare.delivery.dispatch_types import RunPaused
from membercare.delivery.models import (
    CLAIMABLE_STATES,
    CampaignRun,
    Decision,
    OutboxMessage,
    OutboxState,
    RunStatus,
)
from membercare.delivery.planner import refresh_run_counts
from membercare.errors import ConfigurationError, InputError
from membercare.timeutil import UTC

# One logger for all the dispatcher's parts: operators and tests select dispatch logs by this name.
log = logging.getLogger("membercare.delivery.dispatcher")


def take_write_lock(conn: Connection, run_id: int, now: datetime) -> None:
    """Make a read-then-write transaction start with a write. On SQLite (WAL) a transaction that read first
    cannot upgrade to a writer once another process has committed ("database is locked" at once, no busy
    wait), which concurrent dispatchers on one run would hit; on PostgreSQL it locks the run's row, which
    serialises the few run-level updates of concurrent dispatchers."""
    r = CampaignRun.__table__
    conn.execute(sa.update(r).where(r.c.id == run_id).values(updated_at=now))


def start_run(engine: Engine, run_id: int, resume: bool, now: datetime) -> sa.Row[Any]:
    """Mark the run ``dispatching`` and return its row. A paused run raises :class:`RunPaused` unless
    ``resume`` is given or its automatic resumption (after an error-budget pause) is due."""
    r = CampaignRun.__table__

    def work(conn: Connection) -> sa.Row[Any]:
        take_write_lock(conn, run_id, now)
        run = conn.execute(sa.select(r).where(r.c.id == run_id)).first()
        if run is None:
            raise InputError(f"no campaign run with id {run_id}")
        values: dict[str, Any] = dict(status=RunStatus.DISPATCHING.value, status_reason=None, updated_at=now,
                                      started_at=sa.func.coalesce(r.c.started_at, now), auto_resume_at=None)
        if run.status == RunStatus.CANCELLED:
            raise RunPaused(f"run {run.campaign}/{run.occurrence} was cancelled ({run.status_reason}); a "
                            "cancelled run is never sent again")
        if run.status == RunStatus.PAUSED and not resume:
            due = run.auto_resume_at
            if due is None or due > now:
                when = f"; resumes automatically at {due.isoformat()}" if due is not None else "; resume it"
                raise RunPaused(f"run {run.campaign}/{run.occurrence} is paused: {run.status_reason}{when}")
            # Paused by the error budget with automatic resumption: probe the provider again. The budget
            # window starts empty, so a provider still down pauses the run again after a few answers.
            values["auto_resumes"] = r.c.auto_resumes + 1
            log.warning("run %s: resuming automatically after an error-budget pause (%s)", run_id,
                        run.status_reason)
        conn.execute(sa.update(r).where(r.c.id == run_id).values(**values))
        return run

    return in_transaction(engine, work)


def run_status(engine: Engine, run_id: int) -> str:
    r = CampaignRun.__table__
    return in_transaction(engine, lambda conn: conn.execute(
        sa.select(r.c.status).where(r.c.id == run_id)).scalar_one())


def pause_run(engine: Engine, run_id: int, reason: str, now: datetime, *, auto_resume_after: float | None,
              max_auto_resumes: int, auto_resume: bool = False) -> datetime | None:
    """Pause the run; with ``auto_resume`` and an ``auto_resume_after`` (the campaign's, stored on the run,
    else the given one), schedule the next probe (the cool-down doubles with every automatic resumption, at
    most ``max_auto_resumes`` times). Returns that time, if any."""
    r = CampaignRun.__table__
    log.warning("pausing run %s: %s", run_id, reason)

    def work(conn: Connection) -> datetime | None:
        take_write_lock(conn, run_id, now)  # SQLite: read-then-write must start as a writer
        resumes, allowed = conn.execute(sa.select(r.c.auto_resumes, r.c.auto_resume_after_s)
                                        .where(r.c.id == run_id)).one()
        after = allowed if allowed is not None else auto_resume_after  # the campaign's, else ours
        at = None
        why = reason
        if auto_resume and after is not None and resumes < max_auto_resumes:
            at = now + timedelta(seconds=after * (2 ** resumes))
            why = f"{reason}; resumes automatically at {at.isoformat()} (probe {resumes + 1} of " \
                  f"{max_auto_resumes})"
        conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == RunStatus.DISPATCHING.value).values(
            status=RunStatus.PAUSED.value, status_reason=why[:500], updated_at=now, auto_resume_at=at))
        return at

    return in_transaction(engine, work)


def finish_run(engine: Engine, run_id: int, config_error: ConfigurationError | None, now: datetime) -> str:
    """End a dispatch pass: a configuration error pauses the run; a run with no open rows left is completed.
    Refreshes the run's counts and returns its status."""
    r, o = CampaignRun.__table__, OutboxMessage.__table__

    def work(conn: Connection) -> str:
        take_write_lock(conn, run_id, now)
        if config_error is not None:
            conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status != RunStatus.CANCELLED.value).values(
                status=RunStatus.PAUSED.value, updated_at=now,
                status_reason=f"configuration error: {config_error}"[:500]))
        if conn.execute(sa.select(r.c.status).where(r.c.id == run_id)).scalar_one() == RunStatus.CANCELLED:
            # Rows the send gate handed back after the cancel (claimed, never attempted): settled now, so
            # nothing of a cancelled run waits for a dispatcher that will never come.
            skip_cancelled(conn, run_id, now)
        open_rows = conn.execute(sa.select(sa.func.count()).where(
            o.c.run_id == run_id, o.c.state.in_(CLAIMABLE_STATES + (OutboxState.SENDING.value,)))).scalar_one()
        if open_rows == 0:
            conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == RunStatus.DISPATCHING.value)
                         .values(status=RunStatus.COMPLETED.value, finished_at=now, updated_at=now))
        refresh_run_counts(conn, run_id)
        return conn.execute(sa.select(r.c.status).where(r.c.id == run_id)).scalar_one()

    return in_transaction(engine, work)


CANCELLED_REASON = "the run was cancelled by an operator"


def skip_cancelled(conn: Connection, run_id: int, now: datetime) -> int:
    """Settle every waiting row of a cancelled run ``skipped`` with reason code ``cancelled``; their number."""
    o = OutboxMessage.__table__
    n = conn.execute(sa.update(o).where(o.c.run_id == run_id, o.c.state.in_(CLAIMABLE_STATES)).values(
        state=OutboxState.SKIPPED.value, reason_code=Decision.CANCELLED.value, reason=CANCELLED_REASON,
        next_attempt_at=None, updated_at=now)).rowcount
    return int(n or 0)


def next_due(engine: Engine, run_id: int, clock: Callable[[], datetime]) -> datetime | None:
    """When the run's next claimable row is due (now, by ``clock``, when planned rows exist), or None."""
    o = OutboxMessage.__table__
    row = in_transaction(engine, lambda conn: conn.execute(sa.select(
        sa.func.count().filter(o.c.next_attempt_at.is_(None)),
        sa.func.min(o.c.next_attempt_at),
    ).where(o.c.run_id == run_id, o.c.state.in_(CLAIMABLE_STATES))).one())
    if row[0]:
        return clock()  # planned rows exist (another dispatcher released them): due now
    if row[1] is None:
        return None
    value = row[1]
    if isinstance(value, str):  # SQLite aggregates lose the column type
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
