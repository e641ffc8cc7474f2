"""The deliberately naive baseline for benchmarks: one Prefect task per message.

This flow is **not** how membercare sends campaigns. It is the straightforward Prefect implementation a
user would write first, kept honest so that ``membercare bench`` can measure how far ahead our design
is (issue 8, item 2). It uses the same real components as a campaign run: our segment (or an explicit
member list), our routing rules, our renderer (:class:`membercare.rendering.CampaignRenderer`), our
channel adapters on the real SendGrid, Twilio and firebase-admin SDKs, and the same outbox table::

    ids = load_audience(campaign, as_of)                        # one task: the member ids
    send_message.map(ids, campaign=unmapped(campaign), ...)     # one task run per message
        # each task run: check the ledger for its idempotency key, load the member, pick the first
        # preferred consented channel, render it, send it, insert an outbox row "sent"

with Prefect's defaults (``ThreadPoolTaskRunner``, default cache policy and logging, the local ephemeral
server when no ``PREFECT_API_URL`` is set) and ``retries=2`` as a user would set. It is not sabotaged:
the SDK clients and the compiled templates are built once per process (a module-level cache, as anyone
would write after the first try), and a rerun skips every message already recorded (check-then-send on the
idempotency key).
It is not optimised either: every message pays for one task run, its own queries and its own commit.

Why our design differs (``flows/campaign.py``, ``docs/delivery.md``): each Prefect task run costs 10-20 ms
of orchestration and several writes to the Prefect database, and thousands of them in a burst overload the
SQLite-backed server ("database is locked"; ``/work/shared/STACK-NOTES.md``). membercare therefore runs
one task per *group* of members (planning renders thousands of messages per transaction with set-based
queries) and one task per dispatcher pass (a bounded pool of provider calls with batched ledger writes);
exactly-once rests on the outbox's unique key written *before* the provider call, not on check-then-send.
It does the same work per member as a campaign run: the campaign's holdout (recorded as a skipped row, not
sent), routing by preference, consent and reachability, the frequency cap against other runs' messages,
every channel of the routed chain rendered and its content stored in the outbox row, the offer coupon. Quiet
hours are off in the benchmark's shops, so neither side defers.

What goes wrong at scale, with these defaults (measured; figures in the benchmark results): the default
``ThreadPoolTaskRunner`` has no worker limit, so ``.map`` over 10,000 members starts thousands of threads.
They exhaust the database connection pool (SQLAlchemy's 5 + 10 connections, 30 s wait), so many task runs
fail even after their retries; a task whose ledger insert fails *after* its provider call is retried and
sends the message again (check-then-send cannot prevent it); and the ephemeral SQLite-backed Prefect server
drops task-run events ("Subscription queue is full") and reports "database is locked", so the UI and the
task-run count miss runs. Bounding the pool (``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS=10``) avoided the
failed and duplicate sends in our measurement, but neither the per-message cost nor the lost task-run
records. :func:`run_baseline` records all of this in its result instead of crashing.

Run it with :func:`run_baseline` (a fresh subprocess per measurement, so the ephemeral Prefect server's
state and memory stay out of the caller and the peak RSS is that run's own), or directly::

    python -m bench.per_message_baseline --campaign birthday --as-of 2026-11-23T01:00:00Z --messages 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import flow, task, unmapped

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TAG = "baseline"  # occurrence tag: the baseline's ledger rows never collide with a real run's

# Time spent inside task bodies, as (start, end) perf_counter pairs (one per attempt), and the CPU time of
# the threads inside them. Prefect's share of a run is the wall time during which no task body was running
# and the CPU time spent outside the bodies (see BaselineResult).
_BODY_INTERVALS: list[tuple[float, float]] = []
_BODY_CPU: list[float] = []
# Why attempts failed (retried or not), for the report: with check-then-send a retry after a lost answer resends.
_ATTEMPT_ERRORS: Counter = Counter()
_LAST_SUMMARY: list[dict] = []


# ------------------------------------------------------------------------------------------ shared state


_SHARED: dict[tuple, SimpleNamespace] = {}
_SHARED_LOCK = threading.Lock()


def _shared(campaign: str, as_of: datetime, occurrence_tag: str) -> SimpleNamespace:
    """Settings, engine, campaign, renderer and SDK clients: built once per process and reused by every task.

    (A per-message SDK client would be sabotage: firebase-admin even refuses a second app of one name.)
    """
    key = (campaign, as_of.isoformat(), occurrence_tag)
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is None:
            from channels.registry import build_channels
            from flows.common import engine_for, resolved_env, settings_from
            from membercare.campaigns.occurrence import RunOptions, prepare
            from membercare.campaigns.plan import make_renderer
            from membercare.delivery.planner import get_or_create_run
            from membercare.delivery.policies import load_policy

            env = resolved_env()
            settings = settings_from(env)
            engine = engine_for(settings)
            prepared = prepare(settings, campaign, RunOptions(as_of=as_of, occurrence_tag=occurrence_tag))
            # Same channels as the campaign flow: a provider the shop has not set up is not used.
            from flows.campaign import without_unconfigured_channels

            prepared = without_unconfigured_channels(prepared, env, logging.getLogger("membercare.bench"))
            with engine.connect() as conn:
                policy = load_policy(conn)
            from membercare.campaigns.occurrence import holdout_rate_for

            shared = SimpleNamespace(
                settings=settings, engine=engine, prepared=prepared, policy=policy,
                holdout_rate=holdout_rate_for(prepared.campaign),
                renderer=make_renderer(prepared),
                adapters=build_channels(env, channels=prepared.spec.channels),
                run_id=get_or_create_run(engine, prepared.spec, prepared.as_of))
            _SHARED[key] = shared
        return shared


def close_shared() -> None:
    """Close the SDK clients the tasks of this process built (engines stay in ``flows.common``'s cache)."""
    from channels.registry import close_channels

    with _SHARED_LOCK:
        for shared in _SHARED.values():
            close_channels(shared.adapters)
        _SHARED.clear()


class SendFailed(RuntimeError):
    """The provider did not accept the message (raised so that Prefect retries the task)."""


# ------------------------------------------------------------------------------------------------ tasks


@task(name="load-audience")
def load_audience(campaign: str, as_of: datetime, member_ids: list[int] | None = None, limit: int | None = None,
                  occurrence_tag: str = DEFAULT_TAG) -> list[int]:
    """The campaign's segment (or the given members), at most ``limit`` of them."""
    from membercare.campaigns.audience import resolve_audience
    from membercare.campaigns.occurrence import RunOptions, prepare

    shared = _shared(campaign, as_of, occurrence_tag)
    options = RunOptions(as_of=as_of, occurrence_tag=occurrence_tag, limit=limit,
                         members=tuple(member_ids) if member_ids is not None else None)
    prepared = prepare(shared.settings, shared.prepared.campaign, options, check=False)
    audience = resolve_audience(shared.engine, prepared)
    return [e.member_id for e in audience.entries]


@task(name="send-message", retries=2)
def send_message(member_id: int, campaign: str, as_of: datetime, occurrence_tag: str = DEFAULT_TAG) -> str:
    """Send the campaign's message to one member; returns ``sent:<channel>``, ``already_sent`` or ``skipped:<why>``."""
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        return _send_one(member_id, campaign, as_of, occurrence_tag)
    except Exception as exc:
        _ATTEMPT_ERRORS[f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"] += 1
        raise
    finally:
        _BODY_CPU.append(time.thread_time() - cpu)
        _BODY_INTERVALS.append((started, time.perf_counter()))


def _send_one(member_id: int, campaign: str, as_of: datetime, occurrence_tag: str) -> str:
    import sqlalchemy as sa

    from membercare.campaigns.offers import issue_offer_coupons
    from membercare.db import is_sqlite
    from membercare.delivery.contract import Accepted, OutboundMessage
    from membercare.delivery.models import CampaignRun, Decision, OutboxMessage, OutboxState, encode_contents
    from membercare.delivery.planner import _recent_messages, idempotency_key, new_message_id
    from membercare.delivery.policies import apply_frequency_cap
    from membercare.delivery.routing import candidate_order, load_contexts, route
    from membercare.models import Channel, Purpose
    from membercare.optimise.assignment import in_holdout
    from membercare.timeutil import utcnow

    shared = _shared(campaign, as_of, occurrence_tag)
    prepared, spec = shared.prepared, shared.prepared.spec
    purpose = spec.purpose.value
    o, r = OutboxMessage.__table__, CampaignRun.__table__
    key = idempotency_key(spec.campaign, spec.occurrence, member_id)

    def record(state: OutboxState, code: Decision, reason: str, **values: Any) -> None:
        now = utcnow()
        row = {"message_id": new_message_id(), "run_id": shared.run_id, "campaign": spec.campaign,
               "occurrence": spec.occurrence, "member_id": member_id, "idempotency_key": key, "purpose": purpose,
               "priority": spec.priority, "state": state.value, "reason_code": code.value, "reason": reason,
               "attempts": 0, "transient_failures": 0, "scheduled_at": prepared.as_of, "created_at": now,
               "updated_at": now, "channel": None, "fallback_channels": "", **values}
        with shared.engine.begin() as conn:
            conn.execute(sa.insert(o).values(**row))

    with shared.engine.connect() as conn:
        # Check, then send: a rerun skips members who already got this occurrence's message.
        if conn.execute(sa.select(o.c.id).where(o.c.idempotency_key == key)).first() is not None:
            return "already_sent"
    # The same work as a campaign run: the holdout is recorded, not sent.
    if shared.holdout_rate and in_holdout(member_id, spec.campaign, shared.holdout_rate):
        record(OutboxState.SKIPPED, Decision.HOLDOUT, "holdout (per-message baseline)")
        return "skipped:holdout"
    with shared.engine.connect() as conn:
        member = load_contexts(conn, [member_id], purpose, prepared.as_of,
                               timedelta(days=shared.policy.push_token_max_age_days)).get(member_id)
        if member is None:
            return "skipped:no_member"
        candidates, not_allowed = candidate_order(member.preferred, spec.channels)
        chosen = route(member, candidates, purpose, not_allowed)
        chain: Sequence[str] = chosen.chain
        cap = None
        if chain and spec.purpose == Purpose.MARKETING:  # the frequency cap, against other runs' messages
            recent = _recent_messages(conn, shared.run_id, [member_id], prepared.as_of, shared.policy)
            cap = apply_frequency_cap(chain, recent.get(member_id, ()), priority=spec.priority,
                                      settings=shared.policy)
    if not chain:
        record(chosen.state, chosen.code, chosen.reason[:500])
        return f"skipped:{chosen.code.value}"
    if cap is not None:
        if cap.capped:
            record(OutboxState.SKIPPED, Decision.FREQUENCY_CAP, cap.reason[:500])
            return "skipped:frequency_cap"
        chain = cap.chain
    channel = chain[0]
    if prepared.campaign.offer is not None:  # the offer coupon the template shows, issued before rendering
        with shared.engine.begin() as conn:
            if is_sqlite(conn):  # take SQLite's write lock first, as the planner does (read-then-write fails)
                conn.execute(sa.update(r).where(r.c.id == shared.run_id).values(updated_at=utcnow()))
            issue_offer_coupons(conn, prepared, [member_id])
    with shared.engine.connect() as conn:
        context = shared.renderer.build_context(conn, [member_id], prepared.as_of)[member_id]

    message_id = new_message_id()
    # Every channel of the chain is rendered and stored, as planning does (a fallback sends what was rendered).
    contents = {ch: shared.renderer.render(Channel(ch), context, message_id=message_id, as_of=prepared.as_of)
                for ch in chain}
    content = contents[channel]
    result = shared.adapters[Channel(channel)].send(OutboundMessage(
        message_id=message_id, idempotency_key=key, channel=Channel(channel), purpose=spec.purpose,
        to=member.address(channel) or "", content=content, campaign=spec.campaign, categories=(spec.campaign,)))
    if not isinstance(result, Accepted):
        raise SendFailed(f"member id {member_id}: {channel} not accepted: {type(result).__name__} "
                         f"{getattr(result, 'reason', '')}")

    record(OutboxState.SENT, Decision.SENT, f"sent via {channel} (per-message baseline)", message_id=message_id,
           channel=channel, fallback_channels=",".join(chain[1:]), content=encode_contents(contents), attempts=1,
           provider_message_id=result.provider_message_id, sent_at=utcnow())
    return f"sent:{channel}"


# ------------------------------------------------------------------------------------------------- flow


@flow(name="per-message-baseline")
def per_message_baseline(campaign: str, as_of: datetime, member_ids: list[int] | None = None,
                         limit: int | None = None, occurrence_tag: str = DEFAULT_TAG) -> dict[str, Any]:
    """One task run per message: load the audience, then ``send_message.map`` over it."""
    ids = load_audience(campaign, as_of, member_ids, limit, occurrence_tag)
    futures = send_message.map(ids, campaign=unmapped(campaign), as_of=unmapped(as_of),
                               occurrence_tag=unmapped(occurrence_tag))
    outcomes: Counter = Counter()
    errors: Counter = Counter()
    for future in futures:
        try:
            result = future.result(raise_on_failure=False)
        except Exception as exc:  # noqa: BLE001 - e.g. MissingResult when the server lost the state
            result = exc
        if isinstance(result, BaseException):
            outcomes["failed"] += 1
            errors[f"{type(result).__name__}: {str(result)[:200]}"] += 1
        else:
            outcomes[result.split(":")[0]] += 1
    summary = {"messages": len(ids), "outcomes": dict(outcomes), "errors": dict(errors.most_common(5))}
    _LAST_SUMMARY[:] = [summary]  # for the measurement, should the returned state lose its data
    return summary


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class BaselineResult:
    """One measurement of the per-message baseline.

    ``seconds`` is the flow's wall time (the ephemeral server's start-up is excluded and reported in
    ``startup_seconds``); ``messages_per_s`` is the delivered throughput, ``sent / seconds`` (messages that
    failed, or were sent by an earlier run, do not count). ``prefect_seconds`` is the part of the wall time
    during which no task body was running (the union of the bodies' intervals is subtracted; with parallel
    threads that is a lower bound of the orchestration cost). CPU time is split without that caveat:
    ``cpu_seconds`` of the flow process, ``body_cpu_seconds`` inside the task bodies (thread CPU time),
    ``server_cpu_seconds`` of the ephemeral server, and ``prefect_cpu_share``, the share of all of it spent
    outside the task bodies. ``peak_rss_mb`` is the flow process's, ``server_peak_rss_mb`` the ephemeral
    Prefect server's (0 when ``PREFECT_API_URL`` names a server). ``error`` says what went wrong (Prefect
    overloaded, failed task runs, a time-out): that is a result, not a crash.
    """

    messages: int
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    messages_per_s: float = 0.0
    task_runs: int = 0
    peak_rss_mb: float = 0.0
    prefect_seconds: float = 0.0
    error: str | None = None
    already_sent: int = 0
    skipped: int = 0
    startup_seconds: float = 0.0
    body_seconds: float = 0.0  # sum of the task bodies' durations (over all threads)
    server_peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    body_cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0
    prefect_cpu_share: float = 0.0
    task_run_states: dict[str, int] | None = None
    attempt_errors: dict[str, int] | None = None  # failed attempts by error (the 5 most common)
    task_run_retries: int = 0  # extra attempts; with check-then-send a retry after a lost answer resends
    loadavg_1m: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _union_seconds(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[start, end]``."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted((max(s, start), min(e, end)) for s, e in intervals):
        if e <= s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _peak_rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _children_peak_rss_mb() -> float:
    """Peak RSS of the largest live child process (the ephemeral Prefect server)."""
    import psutil

    peaks = [_peak_rss_mb(p.pid) for p in psutil.Process().children(recursive=True)]
    return max(peaks, default=0.0)


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of the live child processes (the ephemeral Prefect server)."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _count_task_runs(flow_run_id, expected: int, wait_s: float = 120.0) -> tuple[int, dict[str, int], int]:
    """Task runs of the flow run, their final states and their retries, through the Prefect client.

    Task run states reach the server as events that it records asynchronously, so poll until ``expected``
    task runs are there and none is still pending or running (or ``wait_s`` passes).
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    by_flow_run = {"flow_runs": flow_runs.model_dump(mode="json", exclude_unset=True)}
    open_states = {**by_flow_run, "task_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING"]}}}}
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            n = int(client._client.post("/task_runs/count", json=by_flow_run).json())
            unfinished = int(client._client.post("/task_runs/count", json=open_states).json())
            if (n >= expected and not unfinished) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        states: Counter = Counter()
        retries = offset = 0
        while True:
            page = client.read_task_runs(flow_run_filter=flow_runs, limit=200, offset=offset)
            states.update(str(tr.state_type.value if tr.state_type else "none").lower() for tr in page)
            retries += sum(max(0, (tr.run_count or 0) - 1) for tr in page)
            offset += len(page)
            if len(page) < 200:
                break
    return n, dict(states), retries


def _measure(campaign: str, as_of: datetime, member_ids: list[int] | None, limit: int | None,
             occurrence_tag: str) -> BaselineResult:
    """Run the flow once in this process and measure it (the body of the ``python -m`` entry point)."""
    from prefect import get_client

    from membercare.timeutil import utcnow

    res = BaselineResult(messages=0, loadavg_1m=round(os.getloadavg()[0], 2))
    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:  # starts the ephemeral server when no API URL is set
        client.hello()
    res.startup_seconds = time.perf_counter() - t0
    _BODY_INTERVALS.clear()
    _BODY_CPU.clear()
    _ATTEMPT_ERRORS.clear()
    _LAST_SUMMARY.clear()
    started_at = utcnow()
    server_cpu0 = _children_cpu_seconds()
    cpu0 = time.process_time()
    start = time.perf_counter()
    try:
        state = per_message_baseline(campaign, as_of, member_ids, limit, occurrence_tag, return_state=True)
    except BaseException as exc:  # the orchestrator falling over is the measurement
        if isinstance(exc, KeyboardInterrupt):
            raise
        state, res.error = None, f"{type(exc).__name__}: {str(exc)[:500]}"
    end = time.perf_counter()
    res.cpu_seconds = time.process_time() - cpu0
    res.server_cpu_seconds = _children_cpu_seconds() - server_cpu0
    res.body_cpu_seconds = sum(_BODY_CPU)
    res.attempt_errors = dict(_ATTEMPT_ERRORS.most_common(5))
    total_cpu = res.cpu_seconds + res.server_cpu_seconds
    res.prefect_cpu_share = max(0.0, 1 - res.body_cpu_seconds / total_cpu) if total_cpu > 0 else 0.0
    res.seconds = end - start
    res.body_seconds = sum(e - s for s, e in _BODY_INTERVALS)
    res.prefect_seconds = max(0.0, res.seconds - _union_seconds(_BODY_INTERVALS, start, end))
    try:
        summary = state.result(raise_on_failure=False) if state is not None else None
    except Exception:  # noqa: BLE001 - MissingResult: an overloaded server answered with a state without data
        summary = None
    if not isinstance(summary, dict) and _LAST_SUMMARY:
        summary = _LAST_SUMMARY[0]
    if isinstance(summary, dict):
        out = summary["outcomes"]
        res.messages = summary["messages"]
        res.sent, res.failed = out.get("sent", 0), out.get("failed", 0)
        res.already_sent, res.skipped = out.get("already_sent", 0), out.get("skipped", 0)
        if summary["errors"]:
            res.error = f"{res.failed} task runs failed: " + "; ".join(
                f"{n}x {msg}" for msg, n in summary["errors"].items())
    else:  # the flow run itself failed: count what reached the ledger
        if state is not None:
            res.error = res.error or f"flow run {state.type.value}: {(state.message or '')[:500]}"
        res.messages = len(member_ids[:limit]) if member_ids is not None else (limit or 0)
        res.sent = _sent_since(os.environ, campaign, started_at)
    if state is not None:
        try:
            res.task_runs, res.task_run_states, res.task_run_retries = _count_task_runs(
                state.state_details.flow_run_id, res.messages + 1)
            if res.task_runs < res.messages + 1:  # the server dropped or never wrote their events
                note = f"Prefect recorded {res.task_runs} of {res.messages + 1} task runs"
                res.error = f"{res.error}; {note}" if res.error else note
        except Exception as exc:  # noqa: BLE001 - an overloaded server is part of the result
            res.error = (res.error + "; " if res.error else "") + f"cannot count task runs: {exc}"
    res.messages_per_s = res.sent / res.seconds if res.seconds > 0 else 0.0
    res.peak_rss_mb = _peak_rss_mb()
    res.server_peak_rss_mb = _children_peak_rss_mb()
    return res


def _sent_since(env: Mapping[str, str], campaign: str, since: datetime) -> int:
    """Baseline rows sent since ``since`` (the caller's count when the subprocess died)."""
    import sqlalchemy as sa

    from membercare.config import Settings
    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage

    settings = Settings.from_env(dict(env))
    o = OutboxMessage.__table__
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(
                o.c.campaign == campaign, o.c.state == "sent", o.c.sent_at >= since,
                o.c.reason.like("%per-message baseline%"))).scalar_one())
    finally:
        engine.dispose()


def run_baseline(n_messages: int, *, env: Mapping[str, str], campaign: str, as_of: datetime,
                 member_ids: Sequence[int] | None = None, timeout_s: float | None = None,
                 occurrence_tag: str = DEFAULT_TAG, log_path: Path | None = None) -> BaselineResult:
    """Run the per-message baseline over ``n_messages`` members in a fresh subprocess and measure it.

    ``env`` is laid over this process's environment (database, templates, secret key and the channels'
    sandbox variables). Prefect runs in its local ephemeral mode with a temporary ``PREFECT_HOME`` unless
    ``env`` sets ``PREFECT_API_URL``. The audience is ``member_ids`` (the first ``n_messages`` of them) or
    else the campaign's segment, cut to ``n_messages``. A Prefect failure under load, a crash of the
    subprocess or ``timeout_s`` passing is recorded in ``error`` together with what was sent. The
    subprocess's output (Prefect's logs: thousands of lines) is kept at ``log_path`` when given.
    """
    from membercare.errors import InputError
    from membercare.timeutil import ensure_utc, utcnow

    if n_messages < 1:
        raise InputError(f"n_messages must be at least 1 (got {n_messages})")
    as_of = ensure_utc(as_of)
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    full_env = {**base, **env}
    tmp = Path(tempfile.mkdtemp(prefix="membercare-baseline-"))
    if not env.get("PREFECT_API_URL"):
        full_env["PREFECT_HOME"] = str(tmp / "prefect")
    full_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server's start-up is not measured; on a busy machine it can take over the default 20 s.
    full_env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
    out_path = tmp / "result.json"
    cmd = [sys.executable, "-m", "bench.per_message_baseline", "--campaign", campaign, "--as-of", as_of.isoformat(),
           "--messages", str(n_messages), "--occurrence-tag", occurrence_tag, "--out", str(out_path)]
    if member_ids is not None:
        ids_path = tmp / "members.json"
        ids_path.write_text(json.dumps([int(m) for m in list(member_ids)[:n_messages]]))
        cmd += ["--members-file", str(ids_path)]
    started_at = utcnow()
    output = tmp / "output.log"
    error: str | None = None
    try:
        with open(output, "wb") as log:  # a file, not a pipe: 10,000 task runs log a lot
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout_s:g} s"
            finally:
                try:  # the subprocess and its ephemeral Prefect server, whatever state they are in
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if error is None and out_path.exists():
            return BaselineResult.from_dict(json.loads(out_path.read_text()))
        if error is None:
            tail = output.read_text(errors="replace")[-1500:].strip()
            error = f"baseline process exited with {proc.returncode}: {tail}"
        res = BaselineResult(messages=n_messages if member_ids is None else min(n_messages, len(member_ids)),
                             error=error, loadavg_1m=round(os.getloadavg()[0], 2))
        res.seconds = (utcnow() - started_at).total_seconds()
        try:
            res.sent = _sent_since(full_env, campaign, started_at)
        except Exception as exc:  # noqa: BLE001 - report what we could not count
            res.error += f"; cannot count sent messages: {exc}"
        return res
    finally:
        if log_path is not None and output.exists():
            shutil.copyfile(output, log_path)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.per_message_baseline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--campaign", required=True)
    ap.add_argument("--as-of", required=True, help="ISO instant")
    ap.add_argument("--messages", type=int, required=True, help="at most this many members")
    ap.add_argument("--members-file", type=Path, help="JSON list of member ids (default: the campaign's segment)")
    ap.add_argument("--occurrence-tag", default=DEFAULT_TAG)
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)
    from membercare.timeutil import ensure_utc, utcnow

    as_of = ensure_utc(datetime.fromisoformat(args.as_of.replace("Z", "+00:00")))
    members = json.loads(args.members_file.read_text()) if args.members_file else None
    started_at = utcnow()
    try:
        res = _measure(args.campaign, as_of, members, args.messages, args.occurrence_tag)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a measurement that failed is a result too
        import traceback

        traceback.print_exc()
        res = BaselineResult(messages=len(members[:args.messages]) if members is not None else args.messages,
                             error=f"measurement failed: {type(exc).__name__}: {str(exc)[:800]}",
                             peak_rss_mb=_peak_rss_mb(), loadavg_1m=round(os.getloadavg()[0], 2))
        try:
            res.sent = _sent_since(os.environ, args.campaign, started_at)
        except Exception:  # noqa: BLE001 - the error above is what matters
            pass
    finally:
        close_shared()
    text = json.dumps(res.to_dict())
    if args.out:
        args.out.write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
