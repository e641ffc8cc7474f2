"""``membercare bench``: the end-to-end benchmark (generated shops, one campaign through the real flows,
the provider sandbox and the webhook receiver; per-stage time, throughput, memory and Prefect's share)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from membercare.cli import app
from membercare.cli.common import console
from membercare.errors import ConfigurationError


@app.command("bench")
def bench(
    members: str = typer.Option("10000,100000,1000000", "--members",
                                help="Shop sizes (comma-separated; 10k and 1M style allowed). One campaign per size."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default bench/results/e2e-<timestamp>/)."),
    baseline: str = typer.Option("1000,10000", "--baseline",
                                 help="Message counts for the plain one-task-per-message Prefect flow (0: skip)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the generated shops and the simulated recipients."),
    cache: Path = typer.Option(Path("/tmp/membercare-bench-cache"), "--cache",
                               help="Where generated shops are kept between runs (copied per run, never changed)."),
    db: str = typer.Option("sqlite", "--db", help="sqlite or postgres (a fresh database per size)."),
    postgres_url: str | None = typer.Option(None, "--postgres-url",
                                            help="PostgreSQL server URL for --db postgres (default: "
                                                 "MEMBERCARE_DATABASE_URL)."),
    keep: bool = typer.Option(False, "--keep", help="Keep the work folder (database copies, service logs)."),
    drain_timeout: float = typer.Option(1800.0, "--drain-timeout", help="Seconds to wait for the webhooks to drain."),
    dispatchers: int = typer.Option(1, "--dispatchers",
                                    help="Dispatcher processes per pass (the campaign flow's `dispatchers`)."),
    processes: int | None = typer.Option(None, "--processes",
                                         help="Planning worker processes (the flow's `processes`; default: one "
                                              "per core for large groups; 0: serial)."),
    ceilings: bool = typer.Option(True, "--ceilings/--no-ceilings",
                                  help="Measure the bare render + insert and raw aiohttp ceilings per size."),
    segments: bool = typer.Option(True, "--segments/--no-segments",
                                  help="Run RFM and every standard segment on SQLite and DuckDB per size."),
) -> None:
    """Measure a campaign end to end per shop size, next to the plain Prefect implementation; write
    results.json, results.md and the scaling chart (see docs/benchmark.md)."""
    import time

    harness = _harness()
    sizes = harness.parse_sizes(members, "--members")
    base = [n for n in harness.parse_sizes(baseline, "--baseline") if n > 0]
    opts = harness.BenchOptions(members=sizes, baseline=base, out=out, cache=cache, seed=seed, db=db,
                                postgres_url=postgres_url or (os.environ.get("MEMBERCARE_DATABASE_URL")
                                                              if db == "postgres" else None),
                                keep=keep, drain_timeout_s=drain_timeout, dispatchers=dispatchers,
                                processes=processes, ceilings=ceilings, segments=segments).validate()
    started = time.monotonic()

    def say(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:7.1f}s[/] {msg}")

    previous = _exit_cleanly_on_sigterm()
    try:
        results = harness.run_bench(opts, progress=say)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
    for s in results["sizes"]:
        st, fl = s["stages"], s["campaign_flow"]
        console.print(f"[bold]{s['members']:,} members[/]: sent {s['sent']:,} in {fl['seconds']:.1f} s "
                      f"({fl['messages_per_s']:,.0f} msg/s; segment {st['segment']['seconds']:.1f} s, plan+render "
                      f"{st['plan_render']['seconds']:.1f} s, dispatch {st['dispatch']['seconds']:.1f} s, webhooks "
                      f"{st['webhooks']['seconds']:.1f} s), {fl['task_runs']} task runs, Prefect "
                      f"{100 * (fl['prefect_share'] or 0):.0f} %, exactly once: "
                      f"{'yes' if s['verify']['exactly_once'] else 'NO'}")
    for r in results["ratios"]:
        console.print(f"[bold]plain Prefect at {r['messages']:,} messages[/]: "
                      + (r["error"] if r.get("error") else f"{r['baseline_messages_per_s']:,.1f} msg/s, "
                                                           f"ours {r['ratio']:,.1f}x"
                                                           + (f" ({r['note']})" if r.get("note") else "")))
    for t in results["targets"]:
        console.print(f"- {t['line']}")
    console.print(f"- scaling: {results['scaling']['line']}")
    console.print(f"[bold]results:[/] {results['out']}/results.json, results.md, scaling.svg, scaling.png")


def _harness():
    """The benchmark harness, ``bench/e2e/`` of the source checkout: benchmark scaffolding (it drives Prefect
    and the flows) is not part of the installed package."""
    root = Path(__file__).resolve().parents[2]
    if (root / "bench" / "e2e" / "harness.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench.e2e import harness
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.e2e", "bench.e2e.harness"):
            raise
        raise ConfigurationError("`membercare bench` runs from a source checkout of membercare: the benchmark "
                                 "(bench/e2e/) is not part of the installed package") from None
    return harness


def _exit_cleanly_on_sigterm():
    """SIGTERM ends the benchmark through its ``finally`` blocks (sandbox, receiver, work folder), not abruptly.
    Returns the previous handler (None when not on the main thread, where no handler can be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)
