"""Several dispatcher *processes* on one run, so that dispatch uses every core.

Why processes: at zero provider latency a dispatcher is CPU-bound (the provider SDKs build and send every
request in Python, about half a millisecond per message), and its worker threads share one GIL, so more
threads do not add throughput; more processes do. Each process is a plain :class:`Dispatcher` on the same
run with its own engine, adapters and worker id. The delivery guarantees are the single-process ones,
because they rest on the database, not on the process:

* claims are disjoint: one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` statement per
  batch (PostgreSQL skips rows another process locked; SQLite serialises the statement under its single
  write lock), so no row is claimed, hence sent, by two processes;
* every outcome is recorded guarded by ``state = 'sending' AND claimed_by = <this process>``;
* a process that dies leaves its claimed rows ``sending``; after the lease, those whose provider call never
  began (no ``attempt_started_at``) are sent again, those that may have reached the provider become
  ``unknown`` and are never resent blindly (marketing), exactly as for one process.

Rate limits stay global: a per-channel rate in ``DispatchConfig.rate_limits`` (messages/s) is split evenly
between the processes, so together they never exceed it. Limits shared through the orchestrator (Prefect
global concurrency limits, see ``flows/ratelimits.py``) are passed as ``shared_limits`` and every process
takes its slots from the same limit.

Usage (the flow's ``dispatchers`` parameter and ``bench/dispatch_bench.py --processes`` use this)::

    reports = dispatch_processes(database_url, run_id, 2, env=os.environ, config=DispatchConfig(workers=64))

Each process is ``python -m membercare.delivery.pool`` reading one JSON job on stdin and printing one JSON
report line on stdout; credentials travel in its environment, never on its command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from membercare.errors import ConfigurationError, DeliveryError, InputError

if TYPE_CHECKING:
    from membercare.delivery.dispatcher import DispatchConfig

log = logging.getLogger(__name__)

MAX_PROCESSES = 16


class DispatchProcessError(DeliveryError, RuntimeError):
    """A dispatcher process died or failed without a report. Rows it held stay ``sending`` until the lease
    expires and then become ``unknown`` (never resent blindly); the other processes' work is recorded."""


def split_rates(rates: Mapping[str, float], processes: int) -> dict[str, float]:
    """Each process's share of per-channel rates (messages/s): together they send at most the given rate."""
    return {ch: rate / processes for ch, rate in rates.items() if rate}


def _config_json(config: DispatchConfig) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, timedelta):
            value = {"seconds": value.total_seconds()}
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def _config_from_json(data: Mapping[str, Any]):
    from membercare.delivery.dispatcher import DispatchConfig

    kwargs = dict(data)
    if isinstance(kwargs.get("lease"), Mapping):
        kwargs["lease"] = timedelta(seconds=kwargs["lease"]["seconds"])
    return DispatchConfig(**kwargs)


def dispatch_processes(database_url: str, run_id: int, processes: int, *, env: Mapping[str, str] | None = None,
                       config: DispatchConfig | None = None, channels: Iterable[str] | None = None,
                       resume: bool = False, shared_limits: Sequence[Mapping[str, Any]] = (), python: str | None = None,
                       child_module: str = "membercare.delivery.pool"
                       ) -> list[dict[str, Any]]:
    """Run ``processes`` dispatcher processes on ``run_id`` until each returns; their reports, in order.

    ``env`` (default: this process's environment) configures the adapters of every process (credentials,
    base URLs); ``channels`` restricts them (default: every configured channel). ``config`` is this whole
    dispatch's :class:`DispatchConfig`: its ``rate_limits`` are split between the processes.
    ``shared_limits``: ``{"channel", "name", "limit", "rate"}`` for orchestrator-wide limits (their API
    must be reachable from the processes through ``env``), built in each process by ``child_module``'s
    ``main`` (the orchestration layer's entry point, e.g. ``flows.dispatch_process``, which calls
    :func:`main` with a limiter factory; this package never imports the orchestrator). A report is a dict
    with ``worker``, ``attempts``, ``outcomes``, ``status``, ``stop_reason``, ``next_due_at`` (ISO or None),
    ``recovered_unknown``, ``elapsed``. Raises ``ConfigurationError``/``RunPaused`` as one dispatcher would
    (after every process stopped), :class:`DispatchProcessError` when a process died.
    """
    from membercare.delivery.dispatcher import DispatchConfig

    if not 1 <= processes <= MAX_PROCESSES:
        raise InputError(f"dispatcher processes must be between 1 and {MAX_PROCESSES}, not {processes}")
    cfg = config or DispatchConfig()
    cfg = dataclasses.replace(cfg, rate_limits=split_rates(cfg.rate_limits, processes),
                              bursts={ch: b / processes for ch, b in cfg.bursts.items()})
    job = {"database_url": database_url, "run_id": int(run_id), "resume": bool(resume), "config": _config_json(cfg),
           "channels": sorted(str(c) for c in channels) if channels is not None else None,
           "shared_limits": [dict(s) for s in shared_limits]}
    child_env = dict(os.environ if env is None else env)
    # The child must import this package the way the parent did (a source checkout on sys.path).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, child_env.get("PYTHONPATH")]))
    if shared_limits and child_module == "membercare.delivery.pool":
        raise InputError("shared rate limits need a child_module that can build them (flows.dispatch_process)")
    cmd = [python or sys.executable, "-m", child_module]
    procs = [subprocess.Popen(cmd, env=child_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    outputs: list[tuple[str, str]] = [("", "")] * processes

    def talk(i: int) -> None:  # one thread per process: no pipe can fill up while we wait for another
        outputs[i] = procs[i].communicate(json.dumps(job))

    threads = [threading.Thread(target=talk, args=(i,), daemon=True) for i in range(processes)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:
        for p in procs:  # interrupted: stop the processes (their rows are recorded or recovered later)
            p.terminate()
        raise
    return _collect_reports(procs, outputs)


def _collect_reports(procs: Sequence[subprocess.Popen], outputs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The finished processes' reports, in order; raises what one in-process dispatcher would have raised."""
    reports: list[dict[str, Any]] = []
    failures: list[str] = []
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        for line in err.splitlines()[-20:]:
            log.warning("dispatcher process %d: %s", i, line)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            failures.append(f"process {i} exited with code {p.returncode} without a report")
            continue
        reports.append(json.loads(lines[-1]))
    errors = [r["error"] for r in reports if r.get("error")]
    for error in errors:  # the same exceptions one in-process dispatcher raises
        if error["type"] == "ConfigurationError":
            raise ConfigurationError(error["message"])
    for error in errors:
        if error["type"] == "RunPaused":
            from membercare.delivery.dispatcher import RunPaused

            raise RunPaused(error["message"])
    if failures or errors:
        raise DispatchProcessError("; ".join(failures + [f"{e['type']}: {e['message']}" for e in errors]))
    return reports


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary of several process reports (outcomes added, the earliest next due time)."""
    outcomes: Counter = Counter()
    for r in reports:
        outcomes.update(r.get("outcomes") or {})
    due = [r["next_due_at"] for r in reports if r.get("next_due_at")]
    return {"attempts": sum(r.get("attempts", 0) for r in reports), "outcomes": dict(outcomes),
            "status": reports[-1]["status"] if reports else "",
            "stop_reason": next((r["stop_reason"] for r in reports if r.get("stop_reason")), None),
            "next_due_at": min(due) if due else None,
            "recovered_unknown": sum(r.get("recovered_unknown", 0) for r in reports),
            "recovered_unattempted": sum(r.get("recovered_unattempted", 0) for r in reports),
            "elapsed": max((r.get("elapsed", 0.0) for r in reports), default=0.0)}


# ------------------------------------------------------------------------------------------------ child


LimiterFactory = Callable[[Mapping[str, Any]], Any]


def _child(job: Mapping[str, Any], make_limiter: LimiterFactory | None = None) -> dict[str, Any]:
    from channels.registry import build_channels, close_channels
    from membercare.db import make_engine
    from membercare.delivery.dispatcher import Dispatcher, RunPaused

    try:
        adapters = build_channels(os.environ, channels=job.get("channels"))
    except ConfigurationError as exc:
        return {"worker": None, "error": {"type": "ConfigurationError", "message": str(exc)}}
    engine = make_engine(job["database_url"])
    try:
        dispatcher = Dispatcher(engine, {str(getattr(k, "value", k)): v for k, v in adapters.items()},
                                config=_config_from_json(job["config"]))
        for spec in job.get("shared_limits") or ():
            if make_limiter is None:
                raise ConfigurationError("shared rate limits were given but this process cannot build them")
            dispatcher.use_limiters({spec["channel"]: make_limiter(spec)})
        try:
            rep = dispatcher.dispatch(int(job["run_id"]), resume=bool(job.get("resume")))
        except (ConfigurationError, RunPaused) as exc:
            return {"worker": dispatcher.worker_id, "error": {"type": type(exc).__name__, "message": str(exc)}}
    finally:
        close_channels(adapters)
        engine.dispose()
    due = rep.next_due_at
    return {"worker": rep.worker, "attempts": rep.attempts, "outcomes": dict(rep.outcomes), "status": rep.status,
            "stop_reason": rep.stop_reason, "next_due_at": due.isoformat() if isinstance(due, datetime) else None,
            "recovered_unknown": rep.recovered_unknown, "recovered_unattempted": rep.recovered_unattempted,
            "resume_at": rep.resume_at.isoformat() if rep.resume_at else None, "elapsed": rep.elapsed}


def main(make_limiter: LimiterFactory | None = None) -> None:
    """A dispatcher process: one JSON job on stdin, one JSON report line on stdout. ``make_limiter(spec)``
    builds a shared limiter from a ``shared_limits`` entry (the orchestration layer passes it)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(sys.stdin.read())
    report = _child(job, make_limiter)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
