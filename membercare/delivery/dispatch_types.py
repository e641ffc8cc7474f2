"""What the dispatcher's parts pass between them: its configuration and report, a claimed row on its way to
the provider (:class:`Job`) and the ledger update that settles it (:class:`Outcome`).

:class:`DispatchConfig`, :class:`DispatchReport` and :class:`RunPaused` are public through
:mod:`membercare.delivery.dispatcher`; import them from there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from membercare.delivery.contract import Content, OutboundMessage
from membercare.delivery.routing import MemberContext
from membercare.errors import InputError


class RunPaused(InputError):
    """The run is paused (error budget, configuration error or an operator); resume it explicitly."""


TRANSPORTS = ("async", "threads")


@dataclass(frozen=True)
class DispatchConfig:
    workers: int = 32  # concurrent provider calls
    batch_size: int = 200  # rows per claim
    rate_limits: Mapping[str, float] = field(default_factory=dict)  # channel -> messages/s (absent: unlimited)
    bursts: Mapping[str, float] = field(default_factory=dict)
    max_transient_failures: int = 8  # then failed (throttling does not count)
    backoff_base: float = 2.0  # seconds; attempt n waits up to base * 2**(n-1), capped
    backoff_max: float = 600.0
    error_window: int = 200
    error_min_samples: int = 50
    flush_every: int = 100
    flush_interval: float = 0.2
    # Keep running while the next deferred row is due within this many seconds (else return and let
    # the scheduler call again at report.next_due_at).
    wait_for_deferred: float = 0.0
    lease: timedelta = timedelta(minutes=5)  # sending rows older than this are from a dead process
    # Transactional messages after an ambiguous failure (the provider may have accepted them) are retried
    # no earlier than this: it gives provider events carrying our message id time to arrive and settle
    # the row (mark_sent_from_event), and the provider records (``records=``) are checked before resending.
    ambiguous_retry_delay: float = 30.0
    # After the error budget paused the run: try again automatically after this many seconds (doubled
    # after each further pause, at most ``max_auto_resumes`` times). The campaign's ``auto_resume_after``
    # (stored on the run) wins; None for both: an operator resumes it.
    auto_resume_after: float | None = None
    max_auto_resumes: int = 5
    # A send whose pacing wait after the gate exceeded this many seconds passes the gate again before its
    # provider call, so the gate-to-request window stays short (see GatedSender.send).
    gate_slack: float = 0.1
    # "async": the worker threads pass the gate and hand each HTTP exchange to one event loop per process
    # (aiohttp, for adapters with ``send_async``); "threads": each worker thread makes the adapter's blocking
    # call. Either way at most ``workers`` provider calls are in flight (see dispatch_pool).
    transport: str = "async"
    # With the async transport and every adapter offering ``send_async``: the threads that pass the gate and
    # hand calls to the loop (they do not wait for answers, so a few keep ``workers`` calls in flight, and
    # fewer threads cost less CPU per message). An adapter without it keeps ``workers`` threads.
    gate_threads: int = 8

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise InputError(f"dispatch transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        if self.workers < 1 or self.gate_threads < 1:
            raise InputError("workers and gate_threads must be at least 1")


@dataclass
class DispatchReport:
    run_id: int
    worker: str
    outcomes: Counter = field(default_factory=Counter)  # sent, deferred, throttled, failed, fallback, ...
    attempts: int = 0
    status: str = ""
    stop_reason: str | None = None
    next_due_at: datetime | None = None
    recovered_unknown: int = 0
    recovered_unattempted: int = 0
    elapsed: float = 0.0
    # The run was paused by the error budget and will be resumed automatically from this time on.
    resume_at: datetime | None = None
    gate_commits: int = 0  # send-gate transactions, and the messages they admitted or stopped
    gate_items: int = 0


# The gate's verdicts besides an outcome: send now, or the row is no longer ours (say nothing about it).
GO = object()
DROP = object()


@dataclass(eq=False)  # identity: jobs are keys of the in-flight set
class Job:
    row: Mapping[str, Any]
    ctx: MemberContext | None
    channel: str
    chain_rest: tuple[str, ...]
    contents: dict[str, Content]
    message: OutboundMessage | None = None
    view_version: int = 0  # delivery_controls.version read before ``ctx`` was loaded
    gated: Any = None  # the send gate's outcome when it stopped the row before the provider call
    # Filled by SendPool: the adapter's answer or the exception it raised; ``started``/``cancelled`` decide
    # whether a job may still be withdrawn (never once its provider call may have begun).
    result: Any = None
    error: BaseException | None = None
    started: bool = False
    cancelled: bool = False


@dataclass
class Outcome:
    id: int
    values: dict[str, Any]
    claim: str = ""  # the claim token the row is held under (recording is guarded by it)
    budget: bool | None = None  # True failure, False success, None not counted
    kind: str = ""
    side_effect: Callable[[Connection], None] | None = None


def outcome_for(row: Mapping[str, Any], values: dict[str, Any], **kw: Any) -> Outcome:
    return Outcome(row["id"], values, claim=row["claim"], **kw)
