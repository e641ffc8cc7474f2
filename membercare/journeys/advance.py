"""The advancer: take due journey instances in batches, execute their steps exactly once, move them on.

One batch is one transaction (:func:`membercare.db.in_transaction`, retried on a deadlock or a dropped
connection):

1. **claim** up to ``batch_size`` active instances whose ``due_at`` has come, oldest first. PostgreSQL:
   ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent advancers take disjoint batches and never wait on each
   other. SQLite: ``UPDATE ... SET claim_token = <new token>`` on the same selection, which makes this
   transaction the database's one writer until it ends (a second advancer waits), then the rows are read back
   by their token;
2. for each instance, the journey's **exit conditions** are checked before every step, then its steps run
   until it has to wait: a wait or a wait-for-event sets ``due_at`` and stops; a branch logs its reason and
   jumps; a **send** is gathered and planned with the other instances at the same step in one planner call
   (:mod:`.send`), its outbox row in this same transaction;
3. each step taken is logged in ``journey_steps`` (unique per instance and step) and the instances are
   written back.

Exactly once: the outbox row of a send, the step's log row and the instance's move to its next step commit
together. A crash anywhere before the commit (an exception between claim and send, a killed process, a lost
connection) rolls all three back and the instance is due again, unchanged; after the commit the instance is
past the step, and a second advancer can neither claim it meanwhile (locked or serialised) nor plan its step
again (the outbox key and the step log are unique). So no step is sent twice and none is skipped.

Time comes from the injected ``clock`` only (tests move it; the flow passes the real one).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare import signals
from membercare.config import Settings
from membercare.db import in_transaction, is_sqlite
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.journeys.conditions import InstanceView, evaluate, event_happened, exit_reason
from membercare.journeys.definition import END, Journey, Step, list_journeys, parse_duration
from membercare.journeys.entry import wake_engaged
from membercare.journeys.models import InstanceStatus, JourneyInstance, JourneyStep
from membercare.journeys.send import Senders, plan_sends, take_plan_lock
from membercare.journeys.waits import wait_until
from membercare.models import Member
from membercare.timeutil import utcnow

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
MAX_HOPS = 50  # steps one instance may take in one pass (journeys never loop: bounded by their length anyway)


@dataclass
class AdvanceReport:
    """What advancing did (counts only): published by the flow as an artifact."""

    batches: int = 0
    claimed: int = 0
    steps: Counter = field(default_factory=Counter)  # "<kind>:<outcome>" -> steps taken
    sends: Counter = field(default_factory=Counter)  # outbox state of each planned send
    exited: Counter = field(default_factory=Counter)  # exit reason -> instances
    completed: int = 0
    woken: int = 0  # instances waiting for an open or click that one of their messages got
    run_ids: set[int] = field(default_factory=set)  # outbox runs that got rows (to dispatch)

    def add(self, other: AdvanceReport) -> None:
        self.batches += other.batches
        self.claimed += other.claimed
        self.steps.update(other.steps)
        self.sends.update(other.sends)
        self.exited.update(other.exited)
        self.completed += other.completed
        self.woken += other.woken
        self.run_ids |= other.run_ids

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "claimed": self.claimed, "steps": dict(sorted(self.steps.items())),
                "sends": dict(sorted(self.sends.items())), "exited": dict(sorted(self.exited.items())),
                "completed": self.completed, "woken": self.woken, "runs": sorted(self.run_ids)}


@dataclass
class _State:
    """An instance being advanced in this batch: what will be written back."""

    view: InstanceView
    step: str | None
    started: datetime | None
    waiting_for: str | None = None
    due_at: datetime | None = None
    status: str = InstanceStatus.ACTIVE.value
    exit_reason: str | None = None
    logs: list[dict] = field(default_factory=list)


class Advancer:
    """Advances due journey instances. ``on_claimed(ids)`` runs right after a batch is claimed, inside its
    transaction (tests inject a crash there)."""

    def __init__(self, engine: Engine, settings: Settings, *, clock: Callable[[], datetime] = utcnow,
                 batch_size: int = DEFAULT_BATCH_SIZE, journeys: Sequence[Journey] | None = None,
                 policy: PolicySettings | None = None, wake_window: timedelta = timedelta(hours=1),
                 on_claimed: Callable[[list[int]], None] | None = None) -> None:
        self.engine, self.settings, self.clock = engine, settings, clock
        self.batch_size = batch_size
        self.journeys = {j.name: j for j in (journeys if journeys is not None else list_journeys(settings))}
        if policy is None:
            with engine.connect() as conn:
                policy = load_policy(conn)
        self.policy = policy
        self.on_claimed = on_claimed
        self.wake_window = wake_window
        self.senders = Senders(engine, settings, clock())
        self.senders.warm(list(self.journeys.values()))

    def advance(self, max_batches: int | None = None, *, wake: bool = True) -> AdvanceReport:
        """Advance batches until none is due (or ``max_batches``); instances moved on to a send run again.

        ``wake``: first wake the instances waiting for an open or a click that arrived (through the provider
        webhooks) in the last ``wake_window``; a caller advancing in several calls wakes in the first only."""
        total = AdvanceReport()
        if wake:
            now = self.clock()
            total.woken = in_transaction(self.engine, lambda conn: wake_engaged(conn, now, self.wake_window))
        while max_batches is None or total.batches < max_batches:
            rep = in_transaction(self.engine, self._batch)
            if not rep.claimed:
                break
            total.add(rep)
        if total.claimed:
            signals.emit(signals.JOURNEY_STEPS_DUE, "membercare.journeys", {
                "claimed": total.claimed, "batches": total.batches, "completed": total.completed,
                "sends": sum(total.sends.values()), "exited": sum(total.exited.values()), "woken": total.woken})
        return total

    # ------------------------------------------------------------------------------------------ one batch

    def _claim(self, conn: Connection, now: datetime) -> list[Any]:
        t = JourneyInstance.__table__
        due = (sa.select(t.c.id).where(t.c.due_at <= now, t.c.status == InstanceStatus.ACTIVE.value)
               .order_by(t.c.due_at, t.c.id).limit(self.batch_size))
        if is_sqlite(conn):
            token = uuid.uuid4().hex
            # The claimed ids come back from the UPDATE itself: selecting them again by token would scan every
            # instance (claim_token has no index), once per batch.
            ids = list(conn.execute(sa.update(t).where(t.c.id.in_(due.scalar_subquery()))
                                    .values(claim_token=token, claimed_at=now).returning(t.c.id)).scalars())
        else:
            ids = list(conn.execute(due.with_for_update(skip_locked=True, of=t)).scalars())
        if not ids:
            return []
        return list(conn.execute(sa.select(t).where(t.c.id.in_(ids)).order_by(t.c.due_at, t.c.id)).all())

    def _batch(self, conn: Connection) -> AdvanceReport:
        now = self.clock()
        rep = AdvanceReport(batches=1)
        rows = self._claim(conn, now)
        rep.claimed = len(rows)
        if not rows:
            return rep
        if self.on_claimed is not None:
            self.on_claimed([r.id for r in rows])
        zones = self._zones(conn, {r.member_id for r in rows})
        states: list[_State] = []
        sends: dict[tuple[str, str], list[_State]] = defaultdict(list)
        for row in rows:
            st = _State(InstanceView.from_row(row), row.step, row.step_started_at, row.waiting_for, row.due_at)
            states.append(st)
            journey = self.journeys.get(row.journey)
            if journey is None:
                self._finish(st, now, InstanceStatus.EXITED, "journey definition missing")
                continue
            step = self._run(conn, journey, st, now, zones.get(row.member_id))
            if step is not None:
                sends[(journey.name, step.id)].append(st)
        if sends:
            take_plan_lock(conn)
        for (jname, step_id), group in sorted(sends.items()):
            self._send(conn, self.journeys[jname], self.journeys[jname].step(step_id), group, now, rep)
        self._write(conn, states, now, rep)
        return rep

    def _zones(self, conn: Connection, member_ids: set[int]) -> dict[int, str]:
        m = Member.__table__
        return dict(conn.execute(sa.select(m.c.id, m.c.timezone).where(m.c.id.in_(sorted(member_ids))))
                    .tuples().all())

    # --------------------------------------------------------------------------------------- one instance

    def _run(self, conn: Connection, journey: Journey, st: _State, now: datetime, zone: str | None) -> Step | None:
        """Take the instance's steps until it waits, finishes or reaches a send (returned, to plan in a group)."""
        tz = self.settings.shop_timezone
        for _ in range(MAX_HOPS):
            if st.step is None or st.step == END:
                self._finish(st, now, InstanceStatus.COMPLETED, None)
                return None
            reason = exit_reason(conn, journey.exit, st.view, now, tz)
            if reason is not None:
                self._finish(st, now, InstanceStatus.EXITED, reason)
                return None
            step = journey.step(st.step)
            if step.send is not None:
                return step
            if step.wait is not None:
                if not self._wait(conn, journey, step, st, now, zone or self.policy.fallback_timezone):
                    return None
            elif step.wait_for is not None:
                if not self._wait_for(conn, journey, step, st, now):
                    return None
            else:
                self._branch(conn, journey, step, st, now)
        raise RuntimeError(f"journey {journey.name}: instance {st.view.id} took {MAX_HOPS} steps in one pass")

    def _move(self, journey: Journey, step: Step, st: _State, now: datetime, outcome: str, target: str | None,
              reason: str | None = None, message_key: str | None = None, ended: datetime | None = None) -> None:
        """Log the step and go to ``target``. ``ended``: when the step ended by the book (a wait's end, a
        timeout), earlier than ``now`` when the advancer runs late; the next step counts from there."""
        st.logs.append(dict(instance_id=st.view.id, journey=journey.name, step=step.id, kind=step.kind,
                            outcome=outcome, reason=(reason or "")[:500] or None, message_key=message_key, at=now))
        st.step = target or journey.following(step.id)
        st.started, st.waiting_for = None, None
        st.due_at = min(ended, now) if ended is not None else now

    def _wait(self, conn: Connection, journey: Journey, step: Step, st: _State, now: datetime, zone: str) -> bool:
        """True when the wait is over (the instance moved on), False when it now waits."""
        assert step.wait is not None
        if st.started is None:
            arrived = _arrival(st, now)
            until, why = wait_until(conn, step.wait, st.view, arrived, zone)
            if until is not None and until > now:
                st.started, st.due_at, st.waiting_for = arrived, until, None
                return False
            self._move(journey, step, st, now, "passed", step.next, why, ended=until or arrived)
            return True
        if st.due_at is not None and st.due_at > now:
            return False  # woken early (nothing wakes a plain wait, but be exact)
        self._move(journey, step, st, now, "waited", step.next, ended=st.due_at)
        return True

    def _wait_for(self, conn: Connection, journey: Journey, step: Step, st: _State, now: datetime) -> bool:
        w = step.wait_for
        assert w is not None
        if st.started is None:
            st.started, st.waiting_for = _arrival(st, now), w.event
            st.due_at = st.started + parse_duration(w.timeout)
            if st.due_at > now:
                return False
        deadline = st.started + parse_duration(w.timeout)
        if event_happened(conn, st.view, w.event, st.started, min(now, deadline)):
            self._move(journey, step, st, now, "event", w.then or step.next, f"{w.event} happened")
            return True
        if now >= deadline:
            self._move(journey, step, st, now, "timeout", w.else_ or step.next,
                       f"no {w.event} within {w.timeout}", ended=deadline)
            return True
        st.due_at = deadline  # woken by another event: keep waiting
        return False

    def _branch(self, conn: Connection, journey: Journey, step: Step, st: _State, now: datetime) -> None:
        b = step.branch
        assert b is not None
        ok, why = evaluate(conn, b.if_, st.view, now, self.settings.shop_timezone)
        self._move(journey, step, st, now, "then" if ok else "else", b.then if ok else b.else_, why)

    def _finish(self, st: _State, now: datetime, status: InstanceStatus, reason: str | None) -> None:
        st.status, st.exit_reason, st.due_at, st.waiting_for, st.started = status.value, reason, None, None, None
        if status == InstanceStatus.COMPLETED:
            st.step = END

    def _send(self, conn: Connection, journey: Journey, step: Step, group: list[_State], now: datetime,
              rep: AdvanceReport) -> None:
        target = self.senders.target(journey, step)
        views = [replace_step(st.view, step.id) for st in group]
        sent = plan_sends(conn, target, views, now, self.policy)
        rep.run_ids.add(target.run_id)
        for st in group:
            got = sent.get(st.view.id)
            if got is None:
                self._move(journey, step, st, now, "no_member", step.next, "member no longer exists")
                continue
            rep.sends[got.state] += 1
            self._move(journey, step, st, now, got.state, step.next, got.reason_code, message_key=got.key)

    # ------------------------------------------------------------------------------------------- write back

    def _write(self, conn: Connection, states: list[_State], now: datetime, rep: AdvanceReport) -> None:
        t, s = JourneyInstance.__table__, JourneyStep.__table__
        logs = [row for st in states for row in st.logs]
        if logs:
            # A plain insert: a second row for an instance's step would be a bug, and it fails the batch loudly.
            conn.execute(sa.insert(s), logs)
        rows = []
        for st in states:
            for row in st.logs:
                rep.steps[f"{row['kind']}:{row['outcome']}"] += 1
            done = st.status != InstanceStatus.ACTIVE.value
            if st.status == InstanceStatus.EXITED.value:
                rep.exited[st.exit_reason or "?"] += 1
            elif st.status == InstanceStatus.COMPLETED.value:
                rep.completed += 1
            rows.append(dict(_id=st.view.id, _step=st.step, _started=st.started, _waiting=st.waiting_for,
                             _due=st.due_at, _status=st.status, _active=None if done else st.view.member_id,
                             _finished=now if done else None, _reason=st.exit_reason if done else None))
        # One statement for the batch (executemany): rows differ only in their values.
        conn.execute(sa.update(t).where(t.c.id == sa.bindparam("_id")).values(
            step=sa.bindparam("_step"), step_started_at=sa.bindparam("_started", type_=t.c.step_started_at.type),
            waiting_for=sa.bindparam("_waiting"), due_at=sa.bindparam("_due", type_=t.c.due_at.type),
            status=sa.bindparam("_status"), active_key=sa.bindparam("_active"),
            finished_at=sa.bindparam("_finished", type_=t.c.finished_at.type), exit_reason=sa.bindparam("_reason"),
            claim_token=None, claimed_at=None, updated_at=now), rows)


def _arrival(st: _State, now: datetime) -> datetime:
    """When the instance reached its current step: the instant it became due (an entry's event time, or when
    the previous step finished), so waits count from there even when the advancer runs late."""
    return st.due_at if st.due_at is not None and st.due_at <= now else now


def replace_step(view: InstanceView, step: str) -> InstanceView:
    return InstanceView(view.id, view.journey, view.member_id, view.entered_at, step, view.step_started_at,
                        view.context)


__all__ = ["DEFAULT_BATCH_SIZE", "AdvanceReport", "Advancer"]
