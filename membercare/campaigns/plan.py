"""Planning a campaign occurrence: coupons, template contexts, rendering and outbox rows for each audience group.

:func:`plan_group` plans one group of audience entries (one Prefect task in ``flows/campaign.py``), batch by
batch: it issues the batch's offer coupons (:mod:`.offers`), builds the template contexts once per batch,
builds the planner hooks of the run (:func:`make_plan_hooks`: holdout, global control, variants, routing
strategy, send time) and hands the batch to the outbox planner (:mod:`membercare.delivery.planner`), which
routes, applies the delivery policies, renders every channel of each member's fallback chain and inserts the
rows under their idempotency keys. Rerunning it adds nothing.

Large groups can be planned with worker processes (``RunOptions.processes``, :func:`planning_processes`): a
fixed pool, spawned once per process and stopped at exit, reads and renders batches while this process keeps
every write (see the section "planning processes" below).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from membercare import signals
from membercare.campaigns.audience import AudienceEntry, AudiencePage, entries_of
from membercare.campaigns.occurrence import PreparedRun, RunOptions
from membercare.campaigns.offers import issue_batch_coupons
from membercare.config import Settings
from membercare.db import make_engine
from membercare.delivery.contract import Content
from membercare.delivery.planner import (
    PlanHooks,
    PlanReport,
    PreparedBatch,
    Recipient,
    RenderRequest,
    get_or_create_run,
    new_message_id,
    plan_run,
    prepare_batch,
    refresh_run_counts,
    write_prepared,
)
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.delivery.routing import MemberContext
from membercare.errors import DataError
from membercare.links import LinkSigner
from membercare.optimise.hooks import build_hooks
from membercare.rendering import CampaignRenderer, ContentLimitError, RenderError
from membercare.rendering.context import with_coupon, with_order
from membercare.rendering.renderer import reset_stores

# Planning groups smaller than this are planned in the calling process even when RunOptions.processes is left
# to its default: starting worker processes (about a second each) would cost more than they save.
POOL_MIN_MEMBERS = 5_000
DEFAULT_MAX_PROCESSES = 4  # planning workers by default: the planning process's writes cap the gain beyond this


class RenderFailed(DataError):
    """A message could not be rendered for one member (template error or over a channel limit).

    Planning of that batch is rolled back; since planning is idempotent, fix the template and rerun.
    """


# ----------------------------------------------------------------------------------- rendering adapter


class PlannerRenderer:
    """Adapts :class:`membercare.rendering.CampaignRenderer` to the planner's ``Renderer`` protocol.

    The template context is built once per *batch* (:func:`recipients_for_batch`, a handful of set-based
    queries) and travels with each :class:`Recipient`; rendering a channel is then pure CPU work.
    """

    def __init__(self, renderer: CampaignRenderer) -> None:
        self.renderer = renderer

    def __call__(self, request: RenderRequest) -> Content:
        if not request.context:
            raise RenderFailed(f"{request.campaign}: no template context for member id {request.member.get('id')}")
        try:
            return self.renderer.render(request.channel, request.context, message_id=request.message_id,
                                        as_of=request.as_of, variant=request.variant)
        except (RenderError, ContentLimitError) as exc:
            raise RenderFailed(f"{request.campaign}: rendering {request.channel.value} for member id "
                               f"{request.member.get('id')} failed: {exc}") from exc


def make_renderer(prepared: PreparedRun, *, preview: bool = False) -> CampaignRenderer:
    """The campaign's renderer; ``preview`` signs links with the preview-only key (dry runs without a secret)."""
    signer = LinkSigner.preview() if preview else None
    return CampaignRenderer(prepared.campaign, prepared.settings, signer=signer)


def recipients_for_batch(conn: Connection, prepared: PreparedRun, renderer: CampaignRenderer,
                         batch: Sequence[AudienceEntry], *, issue_coupons: bool = True) -> list[Recipient]:
    """Issue offer coupons (not to held-out members), build the batch's template contexts, make Recipients."""
    ids = [e.member_id for e in batch]
    if issue_coupons:
        issue_batch_coupons(conn, prepared, ids)
    contexts = renderer.build_context(conn, ids, prepared.as_of)
    out = []
    for e in batch:
        ctx = contexts.get(e.member_id)
        if ctx is None:
            continue  # deleted since the audience was resolved; the planner would refuse it
        if e.coupon_code:
            try:
                ctx = with_coupon(ctx, e.coupon_code)
            except KeyError:
                pass  # redeemed since the segment ran: the soonest open coupon stands in
        if e.order_ref:
            try:
                ctx = with_order(ctx, e.order_ref)
            except KeyError:
                pass  # older than the recent orders the context holds: the last order stands in
        out.append(Recipient(e.member_id, coupon_code=e.coupon_code, context=ctx))
    return out


def make_plan_hooks(engine: Engine, prepared: PreparedRun) -> PlanHooks:
    """The planner's extension points for this run: ``assign`` (holdout, global control, variants),
    ``prefer`` (routing strategy) and ``deliver_at`` (send time). Built once per planning group, so
    anything learnt from engagement history is read once, not per member (and cached across the groups
    of a run: :mod:`membercare.optimise.history`). A dry run computes variant shares without storing them."""
    return build_hooks(engine, prepared.campaign, occurrence=prepared.occurrence, as_of=prepared.as_of,
                       holdout_rate=prepared.holdout_rate, channels=prepared.spec.channels,
                       settings=prepared.settings, store_allocation=not prepared.options.dry_run)


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class PlanOutcome:
    """What planning one group did (counts only)."""

    run_id: int
    inserted: int = 0
    already_planned: int = 0
    preempted: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_report(cls, rep: PlanReport) -> PlanOutcome:
        return cls(rep.run_id, rep.inserted, rep.already_planned, rep.preempted, dict(rep.by_state),
                   dict(rep.by_reason))

    def merge(self, other: PlanOutcome) -> PlanOutcome:
        st, rs = Counter(self.by_state), Counter(self.by_reason)
        st.update(other.by_state)
        rs.update(other.by_reason)
        return PlanOutcome(other.run_id or self.run_id, self.inserted + other.inserted,
                           self.already_planned + other.already_planned, self.preempted + other.preempted,
                           dict(st), dict(rs))


def plan_group(engine: Engine, prepared: PreparedRun, group: Sequence[AudienceEntry] | AudiencePage, *,
               renderer: CampaignRenderer | None = None, policy: PolicySettings | None = None,
               message_ids: Callable[[], str] = new_message_id) -> PlanOutcome:
    """Plan (and render) outbox rows for a group of audience entries, batch by batch. Idempotent.

    With worker processes (``RunOptions.processes``, see :func:`planning_processes`), each batch's reads
    (template and routing contexts, already planned keys) and its rendering run in a worker while this
    process issues coupons and writes earlier batches; this process keeps every write. Otherwise the
    whole batch runs here, as :func:`~membercare.delivery.planner.plan_run` does. ``renderer`` (default: the
    campaign's, :func:`make_renderer`) is used on that serial path only. A snapshot page (``group``, see
    :class:`~membercare.campaigns.audience.AudiencePage`) is read here, so only one group is ever in memory.
    """
    entries = entries_of(engine, group)
    processes = planning_processes(engine, prepared.options, len(entries))
    if processes:
        return _plan_group_pooled(engine, prepared, entries, processes, policy=policy, message_ids=message_ids)
    renderer = renderer or make_renderer(prepared)
    adapter = PlannerRenderer(renderer)
    size = prepared.options.batch_size

    def batches() -> Iterator[list[Recipient]]:
        for i in range(0, len(entries), size):
            batch = entries[i:i + size]
            # Coupons commit in their own short transaction; the planner's batch transaction follows.
            with engine.begin() as conn:
                recipients = recipients_for_batch(conn, prepared, renderer, batch)
            yield recipients

    hooks = make_plan_hooks(engine, prepared)
    report = plan_run(engine, prepared.spec, batches(), prepared.as_of, adapter, policy=policy,
                      message_ids=message_ids, assign=hooks.assign, prefer=hooks.prefer, deliver_at=hooks.deliver_at)
    return PlanOutcome.from_report(report)


def announce_planned(prepared: PreparedRun, outcome: PlanOutcome, audience_size: int) -> None:
    """Planning of every group is done: tell operations (``membercare.campaign.planned``, counts only)."""
    signals.emit(signals.CAMPAIGN_PLANNED, signals.run_resource(outcome.run_id), {
        "campaign": prepared.name, "occurrence": prepared.occurrence, "audience": audience_size,
        "planned": outcome.inserted, "already_planned": outcome.already_planned,
        "planned_states": ", ".join(f"{k} {v}" for k, v in sorted(outcome.by_state.items()))},
        related=(signals.campaign_resource(prepared.name),))


def ensure_run(engine: Engine, prepared: PreparedRun) -> int:
    """The ``campaign_runs`` id of the occurrence (created when missing); an empty audience still gets one."""
    return get_or_create_run(engine, prepared.spec, prepared.as_of)


# ------------------------------------------------------------------------------------ planning processes
#
# Planning a large audience is CPU work: building template contexts, routing, rendering every channel of
# each member's fallback chain and compressing it. Python runs that on one core, so plan_group can hand
# each batch's read-only part to a fixed pool of worker processes (spawned once per process and reused by
# every planning group and run) while this process does what must stay serial: it issues the batch's offer
# coupons, then, when the worker's batch comes back (in order), takes the planning lock, applies the
# frequency cap against the other runs' rows as they are at that moment, and inserts. All writes stay here.
#
# Guarantees are those of the serial path: rows are written before any send with their idempotency keys
# (a rerun adds nothing); the frequency cap is decided under the lock; a worker's error (a template that
# fails for one member) aborts the group with that member named, after the batches before it were
# written. Routing reads consent, reachability and suppressions a moment before the lock is taken;
# the dispatcher re-checks consent and suppression right before every send.


def planning_processes(engine: Engine, options: RunOptions, members: int) -> int:
    """Worker processes for planning ``members`` members: 0 means plan in this process.

    ``options.processes`` None: one worker per core (up to ``DEFAULT_MAX_PROCESSES``) for groups of at least
    ``POOL_MIN_MEMBERS`` members on a machine with two cores or more, else 0; an explicit number is used as
    given whenever the group has more than one batch. An in-memory SQLite database cannot be shared: always 0.
    """
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else "x"
    if not db or db == ":memory:" or members <= options.batch_size:
        return 0
    if options.processes is not None:
        return options.processes
    # Default: one worker per core (at most DEFAULT_MAX_PROCESSES) for groups worth the ~1 s start of each.
    # Measured on 2 idle cores, a 100k-member campaign flow planned in 27.7 s with two workers against
    # 64.8 s serially (docs/benchmark.md); on a machine whose cores are busy the pool gains nothing (and its
    # workers cost ~10 % more CPU in total), so pass processes=0 there.
    cores = os.cpu_count() or 1
    if members < POOL_MIN_MEMBERS or cores < 2:
        return 0
    return min(cores, DEFAULT_MAX_PROCESSES)


_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(processes: int) -> ProcessPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(processes)
        if pool is None:
            # spawn, never fork: the planning process may run threads (Prefect, dispatcher) and hold
            # database connections that a forked child must not share.
            pool = _POOLS[processes] = ProcessPoolExecutor(processes, mp_context=get_context("spawn"))
        return pool


def shutdown_planning_pools() -> None:
    """Stop the planning worker processes (they are otherwise reused until this process exits)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


# Stop the workers while the interpreter is whole; an executor collected during its teardown prints
# "Exception ignored ... 'NoneType' object has no attribute 'util'" at exit. (A no-op when no pool ran.)
atexit.register(shutdown_planning_pools)


@dataclass(frozen=True)
class _PlanJob:
    """One batch for a worker: everything it needs, as plain picklable data."""

    url: str
    run_key: str  # identifies the run (and the template files' state): the worker's renderer cache key
    group_token: str  # identifies the planning group: hooks are built once per group, as in this process
    prepared: PreparedRun
    run_id: int
    policy: PolicySettings
    entries: tuple[AudienceEntry, ...]
    message_ids: tuple[str, ...]


def _templates_signature(settings: Settings, campaign: str) -> str:
    """Names, sizes and modification times of the template files a campaign reads (edits invalidate workers)."""
    root = Path(settings.templates_dir)
    parts = []
    for folder in (root, root / campaign, root / "_layout"):
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.is_file():
                        st = e.stat()
                        parts.append(f"{e.path}:{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            continue
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


def _plan_group_pooled(engine: Engine, prepared: PreparedRun, entries: Sequence[AudienceEntry], processes: int, *,
                       policy: PolicySettings | None, message_ids: Callable[[], str]) -> PlanOutcome:
    run_id = ensure_run(engine, prepared)
    if policy is None:
        with engine.connect() as conn:
            policy = load_policy(conn)
    url = engine.url.render_as_string(hide_password=False)
    run_key = hashlib.sha256(pickle.dumps((url, prepared)) + _templates_signature(
        prepared.settings, prepared.name).encode()).hexdigest()
    token = uuid.uuid4().hex
    report = PlanReport(run_id)
    pool = _pool(processes)
    size = prepared.options.batch_size
    inflight: deque[Future[PreparedBatch]] = deque()

    built: list[PlanHooks] = []

    def deliver_at(ctx: MemberContext, rc: Recipient, channel: str) -> datetime | None:
        # Only needed when a per-channel cap drops a row's first channel (rare): the workers built the hooks
        # for everything else, so this process builds them only then.
        if not built:
            built.append(make_plan_hooks(engine, prepared))
        fn = built[0].deliver_at
        return fn(ctx, rc, channel) if fn else None

    def write(fut: Future[PreparedBatch]) -> None:
        batch = fut.result()
        with engine.begin() as conn:
            write_prepared(conn, run_id, prepared.spec, batch, prepared.as_of, policy, report, deliver_at=deliver_at)

    try:
        for i in range(0, len(entries), size):
            batch = tuple(entries[i:i + size])
            if prepared.campaign.offer is not None:
                with engine.begin() as conn:
                    issue_batch_coupons(conn, prepared, [e.member_id for e in batch])
            job = _PlanJob(url, run_key, token, prepared, run_id, policy, batch,
                           tuple(message_ids() for _ in batch))
            inflight.append(pool.submit(_prepare_in_worker, job))
            # Keep every worker busy while this process writes the oldest batch; never more in flight
            # than that (memory stays flat in the audience size).
            if len(inflight) > processes:
                write(inflight.popleft())
        while inflight:
            write(inflight.popleft())
    except BaseException as exc:
        for fut in inflight:
            fut.cancel()
        if isinstance(exc, BrokenProcessPool):
            with _POOLS_LOCK:
                if _POOLS.get(processes) is pool:
                    del _POOLS[processes]
            pool.shutdown(wait=False, cancel_futures=True)  # a broken pool is never reused; release it now
        raise
    with engine.begin() as conn:
        refresh_run_counts(conn, run_id, reopen=report.inserted > 0)
    return PlanOutcome.from_report(report)


# State of a planning worker process (one job at a time): engines by URL, the current run's renderer and
# the current group's hooks.
_WORKER: dict[str, Any] = {"engines": {}, "run_key": None, "renderer": None, "token": None, "hooks": None}


def _prepare_in_worker(job: _PlanJob) -> PreparedBatch:
    """Worker side of :func:`_plan_group_pooled`: read and render one batch (no writes, no lock)."""
    w = _WORKER
    engine = w["engines"].get(job.url)
    if engine is None:
        engine = w["engines"][job.url] = make_engine(job.url)
    prepared = job.prepared
    if w["run_key"] != job.run_key:
        reset_stores()  # template files may have changed since this worker last compiled them
        w["renderer"], w["run_key"] = make_renderer(prepared), job.run_key
    if w["token"] != job.group_token:
        w["hooks"], w["token"] = make_plan_hooks(engine, prepared), job.group_token
    hooks, renderer = w["hooks"], w["renderer"]
    with engine.connect() as conn:
        recipients = recipients_for_batch(conn, prepared, renderer, job.entries, issue_coupons=False)
        batch = prepare_batch(conn, prepared.spec, recipients, prepared.as_of, PlannerRenderer(renderer), job.policy,
                              hooks.assign, job.message_ids, prefer=hooks.prefer, deliver_at=hooks.deliver_at,
                              run_id=job.run_id)
        conn.rollback()
    return batch


__all__ = ["DEFAULT_MAX_PROCESSES", "POOL_MIN_MEMBERS", "PlanOutcome", "PlannerRenderer", "RenderFailed", "ensure_run",
           "make_plan_hooks", "make_renderer", "plan_group", "planning_processes", "recipients_for_batch",
           "shutdown_planning_pools"]
