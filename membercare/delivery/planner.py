"""Planning: turn a campaign occurrence and its members into outbox rows, before any provider is called.

:func:`plan_run` creates (or finds) the ``campaign_runs`` row of ``(campaign, occurrence)`` and, per batch
of members, in one transaction:

1. loads members, consents, live devices, suppressions, the run's existing rows and (for marketing)
   the members' recent active messages, set-based (a handful of queries per batch, never per member);
2. skips members who already have a row for this occurrence (rerunning planning adds nothing);
3. assigns a variant (extension point: ``assign``; a ``"holdout"`` answer records a skipped row) and
   the channel order (extension point: ``prefer``, e.g. the best_engagement strategy; default the
   member's own preference);
4. routes (:mod:`routing`), applies the frequency cap with priority preemption, the send time
   (extension point: ``deliver_at``) and quiet hours (:mod:`policies`);
5. renders the content of *every channel of the fallback chain* (so dispatch needs no templates and a
   retry or a fallback sends exactly what was planned) and
6. inserts the rows with ``INSERT ... ON CONFLICT (idempotency_key) DO NOTHING``.

Members we decide not to message get a row too (state skipped or suppressed, with the reason), so
the ledger accounts for everyone the segment selected.

:func:`plan_batch` plans one batch inside the caller's transaction (``plan_run`` commits each; the campaign
dry run rolls it back). :func:`prepare_batch` (reads and rendering, no lock) and :func:`write_prepared` (the
planning lock, the frequency cap against other runs' rows, the insert) split a batch so that the first half
can run in worker processes while one process writes (``membercare.campaigns.plan.plan_group``,
``RunOptions.processes``); :func:`plan_batch` runs both in one transaction under the lock.

The three extension points (``assign``, ``prefer``, ``deliver_at``) travel together as :class:`PlanHooks`.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.db import in_transaction, insert_for, is_sqlite
from membercare.delivery.contract import Content, EmailContent, LineContent, PushContent, SmsContent
from membercare.delivery.decisions import NO_DECISION, after_cap, decision_columns
from membercare.delivery.models import (
    ACTIVE_STATES,
    CampaignRun,
    Decision,
    OutboxMessage,
    OutboxState,
    RunStatus,
    decode_contents,
)
from membercare.delivery.policies import (
    PolicySettings,
    RecentMessage,
    apply_frequency_cap,
    load_policy,
    member_zone,
    quiet_hours_until,
)
from membercare.delivery.routing import MemberContext, candidate_order, load_contexts, route
from membercare.delivery.sqlutil import any_of, chunk_size, insert_many_sqlite, insert_returning
from membercare.errors import InputError
from membercare.models import Channel, Purpose
from membercare.timeutil import ensure_utc, utcnow

HOLDOUT = "holdout"
# Members of the programme-wide control group (no marketing at all, to measure the whole programme).
GLOBAL_CONTROL = "global_control"
# PostgreSQL advisory lock taken by every planning batch: frequency-cap decisions read other runs'
# rows and then write, so two campaigns planned concurrently must not both take a member's last slot.
PLAN_LOCK_KEY = 0x6D63_706C  # "mcpl"


@dataclass(frozen=True)
class PlanSpec:
    """What planning needs to know about a campaign occurrence (built from the campaign definition)."""

    campaign: str
    occurrence: str  # e.g. "2026-11-23" for a daily campaign; unique per campaign
    purpose: Purpose
    channels: tuple[Channel, ...]  # the channels the campaign may use
    priority: int = 0  # higher wins frequency-cap slots (see policies)
    error_budget: float = 0.5  # see dispatch_outcomes.ErrorBudget
    auto_resume_after_s: float | None = None  # after an error-budget pause (see dispatcher); None: an operator

    def __post_init__(self) -> None:
        if not self.campaign or "|" in self.campaign or "|" in self.occurrence or not self.occurrence:
            raise InputError("campaign and occurrence must be non-empty and must not contain '|'")
        Purpose(self.purpose)
        for ch in self.channels:
            Channel(ch)


@dataclass(frozen=True)
class Recipient:
    """One member to message. ``coupon_code`` makes one message per coupon (it joins the idempotency key)."""

    member_id: int
    coupon_code: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)  # extra template variables for this member
    # A journey instance (membercare.journeys): joins the idempotency key, so each instance's step is one row.
    instance: str | None = None


@dataclass(frozen=True)
class RenderRequest:
    campaign: str
    occurrence: str
    channel: Channel
    purpose: Purpose
    member: Mapping[str, Any]  # the members row
    message_id: str  # for tracking links and unsubscribe URLs
    as_of: datetime
    coupon_code: str | None = None
    variant: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


class Renderer(Protocol):
    """Extension point: render one channel's content (``membercare.rendering`` provides the real one).

    Raising aborts the batch (its transaction rolls back); since planning is idempotent, fix the
    template and rerun.
    """

    def __call__(self, request: RenderRequest) -> Content: ...


# Extension point (experiments, holdouts): the variant of a member, or HOLDOUT / GLOBAL_CONTROL to record
# but not send.
Assigner = Callable[[MemberContext, Recipient], str | None]
# Extension point (routing strategies such as best_engagement): the member's channel order to use instead
# of their stated preference (``ctx.preferred``), or None to keep it. Consent, reachability and the
# campaign's allowed channels are still checked by routing: a strategy can only reorder.
Preferrer = Callable[[MemberContext, Recipient], Sequence[str] | None]
# Extension point (best send time): when this member should get the message (UTC), or None for now.
# An instant after ``as_of`` defers the row to it (reason_code ``send_time``); quiet hours still apply
# to the chosen instant, and the dispatcher re-checks them when it sends.
DeliveryTimer = Callable[[MemberContext, Recipient, str], datetime | None]


@dataclass(frozen=True)
class PlanHooks:
    """The planner's extension points for one run; None leaves the default behaviour.

    ``assign`` (:data:`Assigner`): variant, holdout or global control of a member. ``prefer``
    (:data:`Preferrer`): the member's channel order. ``deliver_at`` (:data:`DeliveryTimer`): the send time.
    ``membercare.optimise.hooks.build_hooks`` builds them from a campaign's ``optimise:`` block.
    """

    assign: Assigner | None = None
    prefer: Preferrer | None = None
    deliver_at: DeliveryTimer | None = None


@dataclass
class PlanReport:
    run_id: int
    inserted: int = 0
    already_planned: int = 0
    preempted: int = 0
    by_state: Counter = field(default_factory=Counter)  # of inserted rows
    by_reason: Counter = field(default_factory=Counter)

    def add(self, other: PlanReport) -> None:
        self.inserted += other.inserted
        self.already_planned += other.already_planned
        self.preempted += other.preempted
        self.by_state.update(other.by_state)
        self.by_reason.update(other.by_reason)


def idempotency_key(campaign: str, occurrence: str, member_id: int, coupon_code: str | None = None,
                    instance: str | None = None) -> str:
    key = f"{campaign}|{occurrence}|{member_id}"
    key = f"{key}|{coupon_code}" if coupon_code else key
    return f"{key}|@{instance}" if instance else key


def new_message_id() -> str:
    return uuid.uuid4().hex


def get_or_create_run(engine: Engine, spec: PlanSpec, as_of: datetime) -> int:
    r = CampaignRun.__table__
    now = utcnow()

    def work(conn: Connection) -> sa.Row[Any]:
        conn.execute(
            insert_for(conn, r).on_conflict_do_nothing(index_elements=["campaign", "occurrence"]),
            dict(campaign=spec.campaign, occurrence=spec.occurrence, purpose=spec.purpose.value
                 if isinstance(spec.purpose, Purpose) else spec.purpose, priority=spec.priority, as_of=as_of,
                 status=RunStatus.PLANNED.value, error_budget=spec.error_budget, counts="{}",
                 auto_resume_after_s=spec.auto_resume_after_s,
                 created_at=now, updated_at=now),
        )
        return conn.execute(sa.select(r.c.id, r.c.purpose).where(
            r.c.campaign == spec.campaign, r.c.occurrence == spec.occurrence)).one()

    row = in_transaction(engine, work)
    if row.purpose != spec.purpose:
        raise InputError(f"run {spec.campaign}/{spec.occurrence} exists with purpose {row.purpose}")
    return row.id


def plan_run(
    engine: Engine,
    spec: PlanSpec,
    member_batches: Iterable[Sequence[int | Recipient]],
    as_of: datetime,
    renderer: Renderer,
    *,
    policy: PolicySettings | None = None,
    assign: Assigner | None = None,
    message_ids: Callable[[], str] = new_message_id,
    prefer: Preferrer | None = None,
    deliver_at: DeliveryTimer | None = None,
) -> PlanReport:
    """Plan one campaign occurrence. Idempotent: rerunning it inserts only rows that do not exist yet."""
    as_of = ensure_utc(as_of)
    run_id = get_or_create_run(engine, spec, as_of)
    if policy is None:
        with engine.connect() as conn:
            policy = load_policy(conn)
    report = PlanReport(run_id)
    hooks = PlanHooks(assign, prefer, deliver_at)
    for batch in member_batches:
        recipients = [b if isinstance(b, Recipient) else Recipient(int(b)) for b in batch]
        if recipients:
            def work(conn: Connection, recipients: list[Recipient] = recipients) -> PlanReport:
                # Counted per try: a try rolled back by a dropped connection or a deadlock counts nothing.
                part = PlanReport(run_id)
                plan_batch(conn, run_id, spec, recipients, as_of, renderer, policy, message_ids, part, hooks=hooks)
                return part

            report.add(in_transaction(engine, work))
    in_transaction(engine, lambda conn: refresh_run_counts(conn, run_id, reopen=report.inserted > 0))
    return report


def plan_batch(conn: Connection, run_id: int, spec: PlanSpec, recipients: Sequence[Recipient], as_of: datetime,
               renderer: Renderer, policy: PolicySettings, message_ids: Callable[[], str], report: PlanReport, *,
               hooks: PlanHooks = PlanHooks()) -> None:
    """Plan one batch in ``conn``'s transaction: every decision and the insert under the planning lock.

    The caller owns the transaction: :func:`plan_run` commits it, the campaign dry run rolls it back. The
    serial path; :func:`prepare_batch` + :func:`write_prepared` split the same work so that the reading and
    rendering can run in other processes, outside the lock. Counts go to ``report``.
    """
    _take_plan_lock(conn, run_id)
    batch = prepare_batch(conn, spec, recipients, as_of, renderer, policy, hooks.assign, message_ids,
                          prefer=hooks.prefer, deliver_at=hooks.deliver_at, run_id=run_id, cap_now=True)
    report.already_planned += batch.already_planned
    _write(conn, run_id, spec, batch, as_of, policy, report, deliver_at=hooks.deliver_at)


def _take_plan_lock(conn: Connection, run_id: int) -> None:
    # Serialise planning batches. SQLite: make the first statement a write so this transaction holds the
    # write lock from here on (a read-then-write transaction could otherwise fail with a stale snapshot).
    r = CampaignRun.__table__
    conn.execute(sa.update(r).where(r.c.id == run_id).values(updated_at=utcnow()))
    if not is_sqlite(conn):
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PLAN_LOCK_KEY)))


@dataclass
class PreparedBatch:
    """A batch decided and rendered up to (optionally) the frequency cap, ready for :func:`write_prepared`.

    ``rows`` are complete outbox rows. ``pending_cap`` holds, for routed marketing rows whose frequency cap
    is still to be applied (see :func:`prepare_batch`), ``key -> (chain, route reason, send-time instant,
    member time zone)``; their content covers the whole chain. Plain data: it crosses process boundaries.
    """

    keys: list[str]
    rows: list[dict]
    pending_cap: dict[str, tuple[tuple[str, ...], str, datetime | None, str | None]] = field(default_factory=dict)
    already_planned: int = 0


def _recent_messages(conn: Connection, run_id: int | None, ids: Sequence[int], as_of: datetime,
                     policy: PolicySettings) -> dict[int, list[RecentMessage]]:
    """The members' active marketing rows of *other* runs in the cap window (see :mod:`policies`)."""
    o = OutboxMessage.__table__
    recent: dict[int, list[RecentMessage]] = defaultdict(list)
    for part in _chunks(list(ids), chunk_size(conn)):
        for row in conn.execute(
            sa.select(o.c.id, o.c.member_id, o.c.campaign, o.c.priority, o.c.channel, o.c.state, o.c.scheduled_at)
            .where(any_of(conn, o.c.member_id, part), o.c.purpose == Purpose.MARKETING.value, o.c.run_id != run_id,
                   o.c.state.in_(ACTIVE_STATES), o.c.scheduled_at > as_of - policy.cap_window,
                   o.c.scheduled_at <= as_of)
        ):
            recent[row.member_id].append(RecentMessage(row.id, row.campaign, row.priority, row.channel, row.state,
                                                       row.scheduled_at))
    return recent


def _chunks(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def prepare_batch(conn: Connection, spec: PlanSpec, recipients: Sequence[Recipient], as_of: datetime,
                  renderer: Renderer, policy: PolicySettings, assign: Assigner | None,
                  message_ids: Callable[[], str] | Sequence[str], *, prefer: Preferrer | None = None,
                  deliver_at: DeliveryTimer | None = None, run_id: int | None = None,
                  cap_now: bool = False) -> PreparedBatch:
    """Decide and render a batch: reads only (existing rows, routing contexts, recent messages), no lock.

    Members already planned for the occurrence are left out (``already_planned``). With ``cap_now`` the
    frequency cap is applied here, from the other runs' rows as they are now: only correct inside the
    planning lock (the serial path). Without it the cap is left to :func:`write_prepared`, which applies
    it under the lock; the content then covers every channel of the routed chain, since the cap can only
    drop channels. ``message_ids`` is a minting function or a sequence of ids used in order (one per
    member to plan).
    """
    o = OutboxMessage.__table__
    now = utcnow()
    mint = message_ids if callable(message_ids) else iter(message_ids).__next__
    purpose = spec.purpose.value if isinstance(spec.purpose, Purpose) else spec.purpose
    by_key: dict[str, Recipient] = {}
    for rc in recipients:
        by_key.setdefault(idempotency_key(spec.campaign, spec.occurrence, rc.member_id, rc.coupon_code,
                                          rc.instance), rc)
    batch = PreparedBatch(list(by_key), [])
    if not by_key:
        return batch
    existing: set[str] = set()
    for part in _chunks(list(by_key), chunk_size(conn)):
        existing.update(conn.execute(sa.select(o.c.idempotency_key).where(any_of(conn, o.c.idempotency_key, part)))
                        .scalars())
    batch.already_planned = len(existing)
    todo = {k: rc for k, rc in by_key.items() if k not in existing}
    if not todo:
        return batch
    ids = list({rc.member_id for rc in todo.values()})
    contexts = load_contexts(conn, ids, purpose, as_of, timedelta(days=policy.push_token_max_age_days))
    marketing = purpose == Purpose.MARKETING
    recent = _recent_messages(conn, run_id, ids, as_of, policy) if marketing and cap_now else None

    rows = batch.rows
    for key, rc in todo.items():
        ctx = contexts.get(rc.member_id)
        base: dict[str, Any] = dict(
            message_id=mint(), run_id=run_id, campaign=spec.campaign, occurrence=spec.occurrence,
            member_id=rc.member_id, idempotency_key=key, coupon_code=rc.coupon_code, variant=None,
            purpose=purpose, priority=spec.priority, channel=None, fallback_channels="", content=None,
            attempts=0, transient_failures=0, scheduled_at=as_of, next_attempt_at=None, created_at=now,
            updated_at=now, **NO_DECISION)
        if ctx is None:
            raise InputError(f"member id {rc.member_id} does not exist")
        variant = assign(ctx, rc) if assign else None
        base["variant"] = variant
        if variant == HOLDOUT:
            rows.append({**base, "state": OutboxState.SKIPPED.value, "reason_code": Decision.HOLDOUT.value,
                         "reason": "held out of this campaign (control group)"})
            continue
        if variant == GLOBAL_CONTROL:
            rows.append({**base, "state": OutboxState.SKIPPED.value, "reason_code": Decision.GLOBAL_CONTROL.value,
                         "reason": "in the programme's global control group (receives no marketing)"})
            continue
        preferred = (prefer(ctx, rc) if prefer else None) or ctx.preferred
        order, not_allowed = candidate_order(preferred, spec.channels)
        rt = route(ctx, order, purpose, not_allowed)
        if not rt.chain:
            rows.append({**base, "state": rt.state.value, "reason_code": rt.code.value, "reason": rt.reason[:500]})
            continue
        chain, reason = rt.chain, rt.reason
        if marketing and recent is not None:
            cap = apply_frequency_cap(chain, recent.get(rc.member_id, ()), priority=spec.priority, settings=policy)
            if cap.capped:
                rows.append(_capped(base, cap.reason, reason))
                continue
            chain = cap.chain
            if cap.preempt:
                base["_preempt"] = cap.preempt
            if cap.reason:
                reason = f"{reason}; {cap.reason}"
        at = _send_time(deliver_at, ctx, rc, chain[0], as_of)
        _schedule(base, chain, reason, at, ctx.timezone, purpose, as_of, policy)
        base.update(decision_columns(prefer, deliver_at, rc.member_id, chain[0], base["next_attempt_at"] or as_of,
                                     member_zone(ctx.timezone, policy.fallback_timezone), routed_channel=rt.chain[0]))
        if marketing and recent is None:
            batch.pending_cap[key] = (tuple(chain), reason, at, ctx.timezone)
        contents = {
            ch: renderer(RenderRequest(campaign=spec.campaign, occurrence=spec.occurrence, channel=Channel(ch),
                                       purpose=Purpose(purpose), member=ctx.row or {}, message_id=base["message_id"],
                                       as_of=as_of, coupon_code=rc.coupon_code, variant=variant, context=rc.context))
            for ch in chain
        }
        base["content"] = fast_encode_contents(contents)
        rows.append(base)
    return batch


def _capped(base: dict, cap_reason: str, route_reason: str) -> dict:
    return {**base, "state": OutboxState.SKIPPED.value, "reason_code": Decision.FREQUENCY_CAP.value,
            "reason": f"{cap_reason}; would have gone {route_reason}"[:500], "channel": None, "fallback_channels": "",
            "content": None, "next_attempt_at": None, **NO_DECISION}


def _send_time(deliver_at: DeliveryTimer | None, ctx: MemberContext, rc: Recipient, first: str,
               as_of: datetime) -> datetime | None:
    at = deliver_at(ctx, rc, first) if deliver_at else None
    return ensure_utc(at) if at is not None and at > as_of else None


def _schedule(row: dict, chain: Sequence[str], reason: str, at: datetime | None, timezone: str | None, purpose: str,
              as_of: datetime, policy: PolicySettings) -> None:
    """Channel, state and reason of a routed row: due now, at its send time, or after quiet hours."""
    row.update(channel=chain[0], fallback_channels=",".join(chain[1:]))
    until = quiet_hours_until(at or as_of, chain[0], purpose, member_zone(timezone, policy.fallback_timezone), policy)
    if at is not None and until is None:
        row.update(state=OutboxState.DEFERRED.value, next_attempt_at=at, reason_code=Decision.SEND_TIME.value,
                   reason=f"{reason}; send time: deferred to {at.isoformat()}"[:500])
    elif until is not None:
        row.update(state=OutboxState.DEFERRED.value, next_attempt_at=until, reason_code=Decision.QUIET_HOURS.value,
                   reason=f"{reason}; quiet hours: deferred to {until.isoformat()}"[:500])
    else:
        row.update(state=OutboxState.PLANNED.value, next_attempt_at=None, reason_code=Decision.ROUTED.value,
                   reason=reason[:500])


def write_prepared(conn: Connection, run_id: int, spec: PlanSpec, batch: PreparedBatch, as_of: datetime,
                   policy: PolicySettings, report: PlanReport, *, deliver_at: DeliveryTimer | None = None) -> None:
    """Take the planning lock, apply the frequency cap to the batch's pending rows and insert it.

    Rows whose key got planned since :func:`prepare_batch` read (another planner of the same occurrence)
    are counted as already planned. The cap reads the other runs' rows under the lock, so concurrently
    planned campaigns never both take a member's last slot.
    """
    _take_plan_lock(conn, run_id)
    report.already_planned += batch.already_planned
    if batch.rows:
        o = OutboxMessage.__table__
        keys = [r["idempotency_key"] for r in batch.rows]
        existing: set[str] = set()
        for part in _chunks(keys, chunk_size(conn)):
            existing.update(conn.execute(sa.select(o.c.idempotency_key)
                                         .where(any_of(conn, o.c.idempotency_key, part))).scalars())
        if existing:
            report.already_planned += len(existing)
            batch.rows = [r for r in batch.rows if r["idempotency_key"] not in existing]
    for row in batch.rows:
        row["run_id"] = run_id
    if batch.pending_cap and batch.rows:
        _cap_pending(conn, run_id, spec, batch, as_of, policy, deliver_at)
    _write(conn, run_id, spec, batch, as_of, policy, report, deliver_at=deliver_at)


def _cap_pending(conn: Connection, run_id: int, spec: PlanSpec, batch: PreparedBatch, as_of: datetime,
                 policy: PolicySettings, deliver_at: DeliveryTimer | None) -> None:
    pending = batch.pending_cap
    rows = [r for r in batch.rows if r["idempotency_key"] in pending]
    recent = _recent_messages(conn, run_id, list({r["member_id"] for r in rows}), as_of, policy)
    purpose = spec.purpose.value if isinstance(spec.purpose, Purpose) else spec.purpose
    new_head: list[dict] = []
    for i, row in enumerate(batch.rows):
        info = pending.get(row["idempotency_key"])
        if info is None:
            continue
        chain, reason, at, tz = info
        cap = apply_frequency_cap(chain, recent.get(row["member_id"], ()), priority=spec.priority, settings=policy)
        if cap.capped:
            batch.rows[i] = _capped(row, cap.reason, reason)
            continue
        if cap.preempt:
            row["_preempt"] = cap.preempt
        if cap.chain == chain and not cap.reason:
            continue
        if cap.reason:
            reason = f"{reason}; {cap.reason}"
        if cap.chain != chain:
            contents = decode_contents(row["content"])
            row["content"] = fast_encode_contents({ch: contents[ch] for ch in cap.chain})
        if cap.chain[0] != chain[0] and deliver_at is not None:
            new_head.append(row)  # the send time is the new first channel's: asked again below
        _schedule(row, cap.chain, reason, at, tz, purpose, as_of, policy)
        after_cap(row, cap.chain[0], row["next_attempt_at"] or as_of, member_zone(tz, policy.fallback_timezone))
        pending[row["idempotency_key"]] = (cap.chain, reason, at, tz)
    if new_head:
        # Rare (a per-channel cap dropped the first channel): the send-time hook needs the routing context.
        ctxs = load_contexts(conn, [r["member_id"] for r in new_head], purpose, as_of,
                             timedelta(days=policy.push_token_max_age_days))
        for row in new_head:
            chain, reason, _, tz = pending[row["idempotency_key"]]
            rc = Recipient(row["member_id"], coupon_code=row["coupon_code"])
            at = _send_time(deliver_at, ctxs[row["member_id"]], rc, chain[0], as_of)
            _schedule(row, chain, reason, at, tz, purpose, as_of, policy)
            after_cap(row, chain[0], row["next_attempt_at"] or as_of, member_zone(tz, policy.fallback_timezone))


def _write(conn: Connection, run_id: int, spec: PlanSpec, batch: PreparedBatch, as_of: datetime,
           policy: PolicySettings, report: PlanReport, *, deliver_at: DeliveryTimer | None = None) -> None:
    """Preempt what the batch's cap decisions took, then insert (``ON CONFLICT DO NOTHING``) and count."""
    o = OutboxMessage.__table__
    rows = batch.rows
    pending_preempt: dict[str, tuple[int, ...]] = {}
    for row in rows:
        ids = row.pop("_preempt", None)
        if ids:
            pending_preempt[row["idempotency_key"]] = ids
    if pending_preempt:
        recent = _recent_messages(conn, run_id, list({r["member_id"] for r in rows
                                                      if r["idempotency_key"] in pending_preempt}), as_of, policy)
        _preempt(conn, spec, pending_preempt, rows, recent, policy, report)
    if not rows:
        return
    if is_sqlite(conn):
        inserted = {r["idempotency_key"] for r in rows}
        if insert_many_sqlite(conn, o, rows, conflict=["idempotency_key"]) != len(rows):
            # Some key existed (not possible under the planning lock after the existence check, but cheap
            # to be exact about): ours are the rows whose stored message id is the one we minted.
            mine = {r["idempotency_key"]: r["message_id"] for r in rows}
            stored: dict[str, str] = {}
            for part in _chunks(list(mine), chunk_size(conn)):
                stored.update(conn.execute(sa.select(o.c.idempotency_key, o.c.message_id)
                                           .where(any_of(conn, o.c.idempotency_key, part))).tuples().all())
            inserted = {k for k, mid in mine.items() if stored.get(k) == mid}
    else:
        inserted = set(insert_returning(conn, o, rows, conflict=["idempotency_key"], returning="idempotency_key"))
    report.inserted += len(inserted)
    report.already_planned += len(rows) - len(inserted)
    for row in rows:
        if row["idempotency_key"] in inserted:
            report.by_state[row["state"]] += 1
            report.by_reason[row["reason_code"]] += 1


_KIND = {EmailContent: "email", SmsContent: "sms", PushContent: "push", LineContent: "line"}


def fast_encode_contents(contents: Mapping[str, Content]) -> bytes:
    """:func:`~membercare.delivery.models.encode_contents`'s format (zlib-compressed JSON, read back by
    ``decode_contents``), about 40 % cheaper: fields are read directly instead of through
    ``dataclasses.asdict`` (a recursive deep copy), and zlib runs at level 1. Level 1 costs ~10 % more
    bytes than level 6 on our HTML mail and halves the compression time, which at a million members is
    minutes of CPU against a few hundred MB of ledger."""
    payload = {}
    for ch, c in contents.items():
        d = {"kind": _KIND[type(c)], **c.__dict__}
        for key in ("headers", "data"):
            if key in d:
                d[key] = dict(d[key])
        payload[ch] = d
    return zlib.compress(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), 1)


def _preempt(conn: Connection, spec: PlanSpec, pending: Mapping[str, tuple[int, ...]], rows: list[dict[str, Any]],
             recent: Mapping[int, Sequence[RecentMessage]], policy: PolicySettings, report: PlanReport) -> None:
    """Take frequency-cap slots from lower-priority unsent rows; a row a dispatcher claimed meanwhile is kept."""
    o = OutboxMessage.__table__
    wanted = sorted({i for ids in pending.values() for i in ids})
    now = utcnow()
    got = set(conn.execute(
        sa.update(o)
        .where(any_of(conn, o.c.id, wanted), o.c.state.in_((OutboxState.PLANNED.value, OutboxState.DEFERRED.value)))
        .values(state=OutboxState.SKIPPED.value, reason_code=Decision.PREEMPTED.value,
                reason=f"frequency cap: slot taken by higher-priority campaign {spec.campaign} "
                       f"(priority {spec.priority})"[:500],
                next_attempt_at=None, updated_at=now)
        .returning(o.c.id)
    ).scalars())
    report.preempted += len(got)
    for row in rows:
        ids = pending.get(row["idempotency_key"])
        if not ids or all(i in got for i in ids):
            continue
        # Lost a race with a dispatcher: re-check the cap with the slots we actually freed.
        active = len(recent.get(row["member_id"], ())) - sum(1 for i in ids if i in got)
        if policy.marketing_cap is not None and active >= policy.marketing_cap:
            row.update(state=OutboxState.SKIPPED.value, reason_code=Decision.FREQUENCY_CAP.value, content=None,
                       channel=None, fallback_channels="", next_attempt_at=None,
                       reason=f"frequency cap: {active} marketing messages in {policy.cap_window_days}d "
                              f"(cap {policy.marketing_cap}); a lower-priority message was already sending")


def run_counts(conn: Connection, run_id: int) -> dict[str, int]:
    o = OutboxMessage.__table__
    return {s: n for s, n in conn.execute(
        sa.select(o.c.state, sa.func.count()).where(o.c.run_id == run_id).group_by(o.c.state))}


def refresh_run_counts(conn: Connection, run_id: int, *, reopen: bool = False) -> dict[str, int]:
    """Store the state counts on the run; ``reopen`` puts a completed run back to planned (new rows arrived)."""
    r = CampaignRun.__table__
    counts = run_counts(conn, run_id)
    values: dict[str, Any] = dict(counts=json.dumps(counts, sort_keys=True), updated_at=utcnow())
    conn.execute(sa.update(r).where(r.c.id == run_id).values(**values))
    if reopen:
        conn.execute(sa.update(r).where(r.c.id == run_id, r.c.status == RunStatus.COMPLETED.value)
                     .values(status=RunStatus.PLANNED.value, finished_at=None))
    return counts
