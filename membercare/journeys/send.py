"""A journey's send step, planned through the campaign planner and the outbox like any campaign message.

The message is a campaign folder (``campaign.yaml`` with ``trigger: {event: journey.<journey>}`` and its
templates), so routing, consent, the frequency cap, quiet hours, the global control group, offer coupons and
rendering are exactly a campaign's. The run is ``(message, "journey:<step>")``; each row's idempotency key
is the campaign's key plus ``|@<instance id>`` (``Recipient.instance``), so an instance's step is one outbox
row whoever plans it and however often. The advancer plans the rows in the transaction that moves the
instances on (:mod:`.advance`): the row and the step exist together or not at all.

What needs its own connection (the run row, the planner hooks) is built once per step by :class:`Senders`
*before* the advancer's batch transaction opens: on SQLite that transaction holds the write lock, and a
second connection writing would wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.campaigns.audience import AudienceEntry
from membercare.campaigns.occurrence import PreparedRun, RunOptions, prepare
from membercare.campaigns.plan import PlannerRenderer, make_plan_hooks, make_renderer, recipients_for_batch
from membercare.config import Settings
from membercare.db import is_sqlite
from membercare.delivery.models import CLAIMABLE_STATES, CampaignRun, OutboxMessage, RunStatus
from membercare.delivery.planner import (
    PLAN_LOCK_KEY,
    PlanHooks,
    PlanReport,
    get_or_create_run,
    idempotency_key,
    new_message_id,
    plan_batch,
    prepare_batch,
)
from membercare.delivery.policies import PolicySettings
from membercare.journeys.conditions import InstanceView
from membercare.journeys.definition import Journey, Step
from membercare.rendering import CampaignRenderer


def occurrence_for(step: Step) -> str:
    return f"journey:{step.id}"


@dataclass
class SendTarget:
    """Everything a send step needs, built once: the prepared message, its renderer, hooks and run."""

    prepared: PreparedRun
    renderer: CampaignRenderer
    hooks: PlanHooks
    run_id: int


@dataclass(frozen=True)
class Sent:
    """What planning made of one instance's send: the outbox key and the row's state and reason code."""

    key: str
    state: str
    reason_code: str | None


def prepared_message(settings: Settings, step: Step, now: datetime, *, dry_run: bool = False) -> PreparedRun:
    """The step's message as a prepared campaign occurrence ``(message, "journey:<step>")``."""
    assert step.send is not None
    # The journey holds out at entry; the message itself is never held out again.
    opts = RunOptions(as_of=now, holdout_rate=0.0, channels=step.send.channels, dry_run=dry_run)
    prepared = prepare(settings, step.send.message, opts, check=False)
    occ = occurrence_for(step)
    return replace(prepared, occurrence=occ, spec=replace(prepared.spec, occurrence=occ))


class Senders:
    """The send targets of the journeys' send steps, built on first use and kept for the advancer's life."""

    def __init__(self, engine: Engine, settings: Settings, now: datetime) -> None:
        self.engine, self.settings, self.now = engine, settings, now
        self.targets: dict[tuple[str, str], SendTarget] = {}

    def target(self, journey: Journey, step: Step) -> SendTarget:
        key = (journey.name, step.id)
        if key not in self.targets:
            prepared = prepared_message(self.settings, step, self.now)
            self.targets[key] = SendTarget(prepared, make_renderer(prepared), make_plan_hooks(self.engine, prepared),
                                           get_or_create_run(self.engine, prepared.spec, self.now))
        return self.targets[key]

    def warm(self, journeys: Sequence[Journey]) -> None:
        """Build every send step's target now (before a batch transaction takes the write lock)."""
        for j in journeys:
            for s in j.steps:
                if s.send is not None:
                    self.target(j, s)


def take_plan_lock(conn: Connection) -> None:
    """The planner's lock, taken before any run row is touched (the planner takes the run row first, then this
    lock: an advancer planning two steps' runs would otherwise wait on another in the opposite order)."""
    if not is_sqlite(conn):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PLAN_LOCK_KEY)))


def plan_sends(conn: Connection, target: SendTarget, instances: Sequence[InstanceView], now: datetime,
               policy: PolicySettings) -> dict[int, Sent]:
    """Plan one outbox row per instance (in ``conn``'s transaction); instance id -> what was planned."""
    prepared = replace(target.prepared, as_of=now)
    by_member = {i.member_id: i for i in instances}
    with_ctx = recipients_for_batch(conn, prepared, target.renderer, [AudienceEntry(m) for m in by_member])
    recipients = []
    for rc in with_ctx:
        inst = by_member[rc.member_id]
        context = {**rc.context, "journey": {"name": inst.journey, "step": inst.step, "entry": inst.context}}
        recipients.append(replace(rc, context=context, instance=str(inst.id)))
    spec = prepared.spec
    report = PlanReport(target.run_id)
    plan_batch(conn, target.run_id, spec, recipients, now, PlannerRenderer(target.renderer), policy, new_message_id,
               report, hooks=target.hooks)
    keys = {idempotency_key(spec.campaign, spec.occurrence, i.member_id, None, str(i.id)): i.id for i in instances}
    o = OutboxMessage.__table__
    rows = conn.execute(sa.select(o.c.idempotency_key, o.c.state, o.c.reason_code)
                        .where(o.c.idempotency_key.in_(list(keys)))).all()
    out = {keys[r.idempotency_key]: Sent(r.idempotency_key, r.state, r.reason_code) for r in rows}
    if report.inserted:
        # Reopen the run if a dispatcher completed it (as refresh_run_counts(reopen=True) does), without recounting
        # the run's rows every batch: a journey step's run keeps growing, and sync-engagement refreshes counts.
        r = CampaignRun.__table__
        conn.execute(sa.update(r).where(r.c.id == target.run_id, r.c.status == RunStatus.COMPLETED.value)
                     .values(status=RunStatus.PLANNED.value, finished_at=None, updated_at=now))
    return out


def preview_send(conn: Connection, engine: Engine, settings: Settings, step: Step, member_id: int, now: datetime,
                 policy: PolicySettings) -> str:
    """What planning would decide for one member now (state, channel, reason), writing nothing: the
    planner's reads and decisions without its insert, links signed with the preview key."""
    prepared = prepared_message(settings, step, now, dry_run=True)
    renderer = make_renderer(prepared, preview=True)
    hooks = make_plan_hooks(engine, prepared)
    recipients = recipients_for_batch(conn, prepared, renderer, [AudienceEntry(member_id)], issue_coupons=False)
    if not recipients:
        return "the member no longer exists"
    batch = prepare_batch(conn, prepared.spec, recipients, now, PlannerRenderer(renderer), policy, hooks.assign,
                          new_message_id, prefer=hooks.prefer, deliver_at=hooks.deliver_at, cap_now=True)
    row = batch.rows[0]
    where = f" on {row['channel']}" if row.get("channel") else ""
    return f"{row['state']}{where}: {row['reason']}"


def due_journey_runs(conn: Connection, now: datetime) -> set[int]:
    """The journey steps' runs with rows a dispatcher may send now (planned or deferred, due): rows planned by an
    advance that was not followed by its dispatch (a crash between the two, or ``send=False``)."""
    r, o = CampaignRun.__table__, OutboxMessage.__table__
    due = sa.exists().where(o.c.run_id == r.c.id, o.c.state.in_(CLAIMABLE_STATES),
                            sa.or_(o.c.next_attempt_at.is_(None), o.c.next_attempt_at <= now))
    return set(conn.execute(sa.select(r.c.id).where(r.c.occurrence.like("journey:%"), due)).scalars())


__all__ = ["SendTarget", "Senders", "Sent", "due_journey_runs", "occurrence_for", "plan_sends", "prepared_message",
           "preview_send", "take_plan_lock"]
