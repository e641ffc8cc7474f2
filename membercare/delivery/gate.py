"""The send gate: consent, suppression and pause checked at the moment of sending, and the attempt recorded.

A dispatcher claims rows in batches and may hold them for seconds (rate limits, a busy pool) before their
provider call. Whatever can forbid a send may change meanwhile: a member texts STOP, clicks one-click
unsubscribe, an address bounces, an operator pauses the run or pulls the global kill switch. So right
before each provider call the row passes the gate, in one short transaction that

1. reads ``delivery_controls`` (the change ``version`` and the kill switch ``paused_all``) and the run's
   status. On PostgreSQL the controls row is read ``FOR SHARE``: a transaction that revokes consent or
   suppresses an address moves the version through a trigger (migration ``0008_send_gate``), which
   needs that row exclusively, so it either committed before the gate read (the gate sees it) or waits
   until the gate committed (its acknowledgement then comes after the attempt was recorded). On SQLite
   the transaction starts with a write, which holds the database's single write lock the same way;
2. when the version moved since the row's view was loaded (at claim), reloads the member contexts of
   the rows concerned and re-routes them: a channel that is no longer allowed is replaced by the next
   consented one (the row goes back to ``planned`` on it, with the reason) or the row is settled
   ``skipped``/``suppressed``; a changed address is used;
3. writes ``attempt_started_at`` on the rows that may go, guarded by ``state = 'sending' AND claimed_by =
   <this dispatcher>``, and commits. Only then does the provider call start.

So a row is *attempted* (its call may have reached the provider) exactly when ``attempt_started_at`` is
set; a ``sending`` row without it was never attempted, and crash recovery sends it again (see
:func:`membercare.delivery.reconcile.recover_stale`).

Cost: the worker threads of one dispatcher share the gate through a group commit (:class:`GroupCommit`):
whoever arrives while a gate transaction runs joins the next one, so the gate costs one small
transaction per group of messages, not per message, and the member contexts are reloaded only when the
version moved. The residual window: between the gate's commit and the first byte of the HTTP request
(microseconds in the same thread). A revocation that commits inside that window was acknowledged after
the request started.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction, is_sqlite
from membercare.delivery.models import CampaignRun, DeliveryControls
from membercare.timeutil import utcnow

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class GateState:
    version: int
    paused_all: bool
    paused_reason: str | None
    run_status: str | None
    run_reason: str | None


# The gate runs one small transaction per group of messages: its statements are built once (SQLAlchemy
# memoizes a statement's cache key, so a reused statement skips construction and key generation).
_controls, _runs = DeliveryControls.__table__, CampaignRun.__table__
_VERSION = sa.select(_controls.c.version).where(_controls.c.id == 1)
_LOCK = sa.update(_controls).where(_controls.c.id == 1).values(version=_controls.c.version)
_CONTROLS = sa.select(_controls.c.version, _controls.c.paused_all, _controls.c.paused_reason).where(_controls.c.id == 1)
_CONTROLS_SHARED = _CONTROLS.with_for_update(read=True)
_RUN = sa.select(_runs.c.status, _runs.c.status_reason).where(_runs.c.id == sa.bindparam("run_id"))


def read_version(conn: Connection) -> int:
    """The current change version (read it *before* loading the view it versions)."""
    return int(conn.execute(_VERSION).scalar_one_or_none() or 0)


def lock_for_gate(conn: Connection) -> None:
    """Make the rest of this transaction exclusive with revocations (see the module docstring)."""
    if is_sqlite(conn):
        # A no-op write: takes SQLite's write lock now, so no revocation can commit until we do.
        conn.execute(_LOCK)


def read_gate(conn: Connection, run_id: int | None) -> GateState:
    """Controls and the run's status; on PostgreSQL the controls row is locked ``FOR SHARE``."""
    row = conn.execute(_CONTROLS if is_sqlite(conn) else _CONTROLS_SHARED).first()
    status = reason = None
    if run_id is not None:
        run = conn.execute(_RUN, {"run_id": run_id}).first()
        if run is not None:
            status, reason = run.status, run.status_reason
    if row is None:  # a database migrated before the gate existed and never written to
        return GateState(0, False, None, status, reason)
    return GateState(int(row.version), bool(row.paused_all), row.paused_reason, status, reason)


_LOCK_AND_READ = _LOCK.returning(_controls.c.version, _controls.c.paused_all, _controls.c.paused_reason)
_CONTROLS_AND_RUN_SHARED = (
    sa.select(_controls.c.version, _controls.c.paused_all, _controls.c.paused_reason,
              sa.select(_runs.c.status).where(_runs.c.id == sa.bindparam("run_id")).scalar_subquery(),
              sa.select(_runs.c.status_reason).where(_runs.c.id == sa.bindparam("run_id")).scalar_subquery())
    .where(_controls.c.id == 1).with_for_update(read=True, of=_controls))


def enter_gate(conn: Connection, run_id: int | None) -> GateState:
    """:func:`lock_for_gate` then :func:`read_gate`, in fewer statements (the gate runs this for every group of
    messages). SQLite: the no-op write that takes the write lock returns the controls; PostgreSQL: the
    controls row is read ``FOR SHARE`` together with the run's status."""
    if run_id is None:
        lock_for_gate(conn)
        return read_gate(conn, None)
    if is_sqlite(conn):
        row = conn.execute(_LOCK_AND_READ).first()
        run = conn.execute(_RUN, {"run_id": run_id}).first()
        status, reason = (run.status, run.status_reason) if run is not None else (None, None)
    else:
        both = conn.execute(_CONTROLS_AND_RUN_SHARED, {"run_id": run_id}).first()
        if both is None:  # no controls row (see read_gate)
            return read_gate(conn, run_id)
        row, status, reason = both, both[3], both[4]
    if row is None:
        return GateState(0, False, None, status, reason)
    return GateState(int(row.version), bool(row.paused_all), row.paused_reason, status, reason)


def pause_all(engine: Engine, reason: str, *, now: datetime | None = None) -> None:
    """The global kill switch: no provider call starts anywhere once this returns (every run's rows stay
    planned, in flight calls finish). Undo with :func:`resume_all`."""
    _set_kill_switch(engine, True, reason, now)


def resume_all(engine: Engine, *, now: datetime | None = None) -> None:
    _set_kill_switch(engine, False, None, now)


def _set_kill_switch(engine: Engine, paused: bool, reason: str | None, now: datetime | None) -> None:
    c = DeliveryControls.__table__

    def work(conn: Connection) -> None:
        conn.execute(sa.update(c).where(c.c.id == 1).values(
            paused_all=paused, paused_reason=(reason or "")[:500] or None, version=c.c.version + 1,
            updated_at=now or utcnow()))

    in_transaction(engine, work)


def kill_switch(engine: Engine) -> tuple[bool, str | None]:
    """(paused, reason) of the global kill switch."""
    state = in_transaction(engine, lambda conn: read_gate(conn, None))
    return state.paused_all, state.paused_reason


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


_NO_ANSWER = _Failed(RuntimeError("the group commit returned no result for an item"))


class GroupCommit(Generic[K, V]):
    """Many threads, one transaction: ``submit(item)`` blocks until a ``commit(batch)`` that contained
    ``item`` has returned, and gives back that item's result.

    The first thread to arrive runs ``commit`` for everything queued so far; threads arriving meanwhile
    queue for the next one (leader/follower). Under load the batch grows by itself; idle, a lone item
    commits at once, with no added wait. ``commit`` returns ``{item: result}`` for every item of the batch;
    if it raises, every item of that batch raises the same exception.
    """

    def __init__(self, commit: Callable[[Sequence[K]], dict[K, V]]):
        self._commit = commit
        self._cond = threading.Condition()
        self._queue: list[K] = []
        self._results: dict[K, V | _Failed] = {}
        self._busy = False
        self.commits = 0  # how many transactions served how many items: the batching factor
        self.items = 0

    def submit(self, item: K) -> V:
        with self._cond:
            self._queue.append(item)
            while item not in self._results and self._busy:
                self._cond.wait()
            if item in self._results:
                return self._unwrap(self._results.pop(item))
            self._busy = True
            batch, self._queue = self._queue, []
        results: dict[K, V | _Failed]
        try:
            results = dict(self._commit(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter of this batch, and raised here
            results = {it: _Failed(exc) for it in batch}
        with self._cond:
            self._busy = False
            self.commits += 1
            self.items += len(batch)
            for it in batch:
                if it is not item:
                    self._results[it] = results.get(it, _NO_ANSWER)
            self._cond.notify_all()
        return self._unwrap(results.get(item, _NO_ANSWER))

    @staticmethod
    def _unwrap(value):
        if isinstance(value, _Failed):
            raise value.error
        return value
