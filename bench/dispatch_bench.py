"""End-to-end dispatch throughput through the real SDKs against the provider sandbox, next to the ceiling.

For each configuration (messages x provider latency x database) the benchmark seeds a fresh database
(a third of the members each preferring email, SMS and push; all consented, one live push token each),
plans one marketing campaign (content of all three channels rendered per member) and times
``--processes`` dispatcher processes (started and ready before the clock starts) sending it through the
three real adapters (sendgrid, twilio, firebase-admin) to ``membercare sandbox`` in its own process.
Reported per configuration: messages/s of dispatch (claim to recorded outcome), the peak RSS of
the dispatching process, and the ratio to the ceiling: the raw request rate a minimal keep-alive
client (``bench/sandbox_ceiling.py``) reaches against the same sandbox, weighted by the channel mix.

    .venv/bin/python bench/dispatch_bench.py [--messages 10000 100000] [--latency-ms 0 50]
        [--db sqlite postgres] [--workers 128] [--processes 1] [--ceiling-seconds 4] [--transport async]
        [--planned-cache DIR] [--profile DIR]

``--planned-cache`` keeps planned SQLite databases and dispatches from a copy (a 1M plan takes minutes);
``--profile`` writes cProfile output of each dispatcher process and of the sandbox. Each row also reports
CPU milliseconds per message of the dispatcher processes and of the sandbox, and the projected 1M time.

PostgreSQL needs MEMBERCARE_TEST_POSTGRES_URL. Writes bench/results/dispatch_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the test doubles (tests/fakes.py)

RESULTS = ROOT / "bench" / "results"
MIX = {"email": 1 / 3, "sms": 1 / 3, "push": 1 / 3}


def make_service_account(directory: Path, token_uri: str) -> Path:
    """A service-account JSON with a fresh RSA key whose token_uri is the sandbox (real OAuth JWT flow)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "membercare-bench", "private_key_id": "bench-1",
            "private_key": pem, "client_email": "bench@membercare-bench.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": token_uri, "universe_domain": "googleapis.com"}
    path = directory / "service-account.json"
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


def sandbox_env(url: str, sa_path: Path) -> dict[str, str]:
    return {
        "MEMBERCARE_SENDGRID_API_KEY": "SG.bench", "MEMBERCARE_SENDGRID_FROM": "Bench Shop <shop@example.com>",
        "MEMBERCARE_SENDGRID_BASE_URL": url,
        "MEMBERCARE_TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "MEMBERCARE_TWILIO_AUTH_TOKEN": "bench-token",
        "MEMBERCARE_TWILIO_FROM": "+886223456789", "MEMBERCARE_TWILIO_BASE_URL": url,
        "MEMBERCARE_FIREBASE_CREDENTIALS": str(sa_path), "MEMBERCARE_FCM_BASE_URL": url,
    }


def configure_sandbox(url: str, latency_ms: float) -> None:
    import httpx

    patch = {ch: {"latency_ms": latency_ms} for ch in MIX}
    # No STOP replies or uninstalls: every message of the run must be accepted.
    patch["engagement"] = {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in MIX}
    httpx.post(url + "/sandbox/reset", json={}).raise_for_status()
    httpx.post(url + "/sandbox/config", json=patch).raise_for_status()


# ------------------------------------------------------------------------------------------- dispatcher


def dispatcher_process(args) -> None:
    """One dispatcher: build the adapters, say ready, wait for "go" on stdin, dispatch, print one JSON line."""
    from channels.registry import build_channels, close_channels
    from membercare.db import make_engine
    from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
    from membercare.delivery.policies import PolicySettings

    engine = make_engine(args.url)
    adapters = build_channels(os.environ)
    cfg = DispatchConfig(workers=args.workers, batch_size=args.batch_size, flush_every=200, transport=args.transport,
                         gate_threads=args.gate_threads)
    dispatcher = Dispatcher(engine, adapters, config=cfg, policy=PolicySettings(marketing_cap=None, quiet_hours=None))
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if prof is not None:
        prof.enable()
    rep = dispatcher.dispatch(args.run_id, resume=True)
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.path.join(args.profile, f"dispatcher-{os.getpid()}.prof"))
    cpu = time.process_time() - cpu0
    elapsed = time.perf_counter() - t0
    close_channels(adapters)
    engine.dispose()
    print(json.dumps({"sent": rep.outcomes["sent"], "outcomes": dict(rep.outcomes), "elapsed": elapsed, "cpu_s": cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def _plan(url: str, n: int) -> tuple[int, float]:
    """Seed ``n`` members and plan the bench campaign into the database at ``url``: (run id, plan seconds)."""
    from delivery_db_bench import seed_members_split

    from fakes import simple_renderer
    from membercare.db import make_engine
    from membercare.delivery.planner import PlanSpec, plan_run
    from membercare.delivery.policies import PolicySettings
    from membercare.models import Channel, Purpose

    engine = make_engine(url)
    ids = seed_members_split(engine, n)
    t0 = time.perf_counter()
    spec = PlanSpec("bench", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL, Channel.SMS, Channel.PUSH))
    rep = plan_run(engine, spec, [ids[i : i + 2000] for i in range(0, len(ids), 2000)],
                   datetime.now(UTC), simple_renderer,
                   policy=PolicySettings(marketing_cap=None, quiet_hours=None))
    plan_s = time.perf_counter() - t0
    if url.startswith("sqlite"):
        with engine.connect() as conn:  # fold the WAL into the main file so that a plain copy is complete
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return rep.run_id, plan_s


@contextlib.contextmanager
def planned_database(db: str, n: int, cache: Path | None):
    """A database with ``n`` members and the bench run planned: (url, run id, plan seconds or None).

    With ``cache`` (SQLite only) the planned database is kept there and each configuration dispatches from a
    fresh copy of it: planning a million members takes minutes, and dispatch must start from planned rows.
    """
    from delivery_db_bench import fresh_database

    if cache is None or db != "sqlite":
        with fresh_database(db) as url:
            run_id, plan_s = _plan(url, n)
            yield url, run_id, plan_s
        return
    cache.mkdir(parents=True, exist_ok=True)
    master, meta = cache / f"planned-{n}.db", cache / f"planned-{n}.json"
    plan_s = None
    if not (master.exists() and meta.exists()):
        with fresh_database(db) as url:
            run_id, plan_s = _plan(url, n)
            shutil.copyfile(url.removeprefix("sqlite:///"), master)
        meta.write_text(json.dumps({"run_id": run_id, "plan_s": plan_s}))
    run_id = json.loads(meta.read_text())["run_id"]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        copy = Path(tmp) / "bench.db"
        shutil.copyfile(master, copy)
        yield f"sqlite:///{copy}", run_id, plan_s


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), 0.0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run_configuration(db: str, n: int, args, env: dict[str, str], sandbox_pid: int | None = None) -> dict:
    """Seed and plan in this process (or copy a planned database), then time ``args.processes`` dispatcher
    processes on the run; CPU seconds of the dispatchers and of the sandbox during dispatch are reported."""
    with planned_database(db, n, args.planned_cache) as (url, run_id, plan_s):
        cmd = [sys.executable, __file__, "--dispatcher", "--url", url, "--run-id", str(run_id),
               "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--transport", args.transport,
               "--gate-threads", str(args.gate_threads)]
        if args.profile:
            cmd += ["--profile", args.profile]
        procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(args.processes)]
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"dispatcher did not start: {line!r} {p.stderr.read()[-3000:]}")
        sandbox_cpu0 = _proc_cpu_s(sandbox_pid) if sandbox_pid else 0.0
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate() for p in procs]
        wall = time.perf_counter() - t0
        sandbox_cpu = _proc_cpu_s(sandbox_pid) - sandbox_cpu0 if sandbox_pid else 0.0
        if any(p.returncode for p in procs):
            raise SystemExit("\n".join(o[1][-3000:] for o in outs))
        reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    return {"plan_s": plan_s, "dispatch_s": wall, "sent": sum(r["sent"] for r in reports),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
            "dispatcher_cpu_s": sum(r["cpu_s"] for r in reports), "sandbox_cpu_s": sandbox_cpu,
            "outcomes": [r["outcomes"] for r in reports],
            "sent_per_process": [r["sent"] for r in reports]}


# ----------------------------------------------------------------------------------------------- parent


def measure_ceiling(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    from sandbox_ceiling import main_async

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        rates = runner.run(main_async(url, seconds, concurrency))
    mixed = 1 / sum(share / rates[name] for name, share in
                    (("sendgrid", MIX["email"]), ("twilio", MIX["sms"]), ("fcm", MIX["push"])))
    return {"sendgrid": rates["sendgrid"], "twilio": rates["twilio"], "fcm": rates["fcm"], "mixed": mixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    ap.add_argument("--db", nargs="+", default=["sqlite"], choices=("sqlite", "postgres"))
    ap.add_argument("--workers", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--ceiling-seconds", type=float, default=4.0)
    ap.add_argument("--ceiling-concurrency", type=int, default=64)
    ap.add_argument("--processes", type=int, default=1, help="dispatcher processes on the run")
    ap.add_argument("--transport", default="async", choices=("async", "threads"),
                    help="DispatchConfig.transport of the dispatchers")
    ap.add_argument("--gate-threads", type=int, default=8, help="DispatchConfig.gate_threads (async transport)")
    ap.add_argument("--label", default="")
    ap.add_argument("--planned-cache", type=Path, default=None,
                    help="SQLite: keep planned databases in this folder and dispatch from a copy (1M runs)")
    ap.add_argument("--profile", default=None,
                    help="folder: write cProfile output of every dispatcher process and of the sandbox there")
    ap.add_argument("--dispatcher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dispatcher:
        return dispatcher_process(args)

    from sandbox_ceiling import start_sandbox

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    proc, url = start_sandbox(0.0, profile=os.path.join(args.profile, "sandbox.prof") if args.profile else None)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sa_path = make_service_account(Path(tmp), url + "/token")
            env = {**os.environ, **sandbox_env(url, sa_path), "PYTHONPATH": str(ROOT)}
            env.pop("MEMBERCARE_PUBLIC_URL", None)  # no status callbacks: nobody listens in a benchmark
            for latency in args.latency_ms:
                configure_sandbox(url, latency)
                concurrency = max(args.ceiling_concurrency, args.processes * args.workers if latency else 0)
                ceiling = measure_ceiling(url, args.ceiling_seconds, concurrency)
                for db in args.db:
                    for n in args.messages:
                        configure_sandbox(url, latency)
                        load = os.getloadavg()[0]
                        r = run_configuration(db, n, args, env, proc.pid)
                        import httpx

                        stats = httpx.get(url + "/sandbox/stats").json()
                        row = {"label": args.label, "db": db, "messages": n, "latency_ms": latency,
                               "workers": args.workers, "processes": args.processes, "sent": r["sent"],
                               "transport": args.transport, "gate_threads": args.gate_threads,
                               "sent_per_process": r["sent_per_process"],
                               "dispatch_msgs_per_s": round(n / r["dispatch_s"]),
                               "plan_members_per_s": round(n / r["plan_s"]) if r["plan_s"] else None,
                               "peak_rss_mb": round(r["peak_rss_mb"]),
                               # CPU milliseconds per message: dispatcher processes and the sandbox
                               "dispatcher_cpu_ms_per_msg": round(1000 * r["dispatcher_cpu_s"] / n, 3),
                               "sandbox_cpu_ms_per_msg": round(1000 * r["sandbox_cpu_s"] / n, 3),
                               "projected_1m_s": round(1_000_000 * r["dispatch_s"] / n),
                               "outcomes": r["outcomes"],
                               "ceiling_mixed_per_s": round(ceiling["mixed"]),
                               "ceiling": {k: round(v) for k, v in ceiling.items()},
                               "ratio_to_ceiling": round(n / r["dispatch_s"] / ceiling["mixed"], 3),
                               "duplicates": stats["duplicates_by_message_id_total"]
                               + stats["duplicates_by_idempotency_key_total"],
                               "accepted": stats["accepted_total"], "loadavg_1m_at_start": round(load, 2),
                               "cpus": os.cpu_count()}
                        print(json.dumps(row), flush=True)
                        results.append(row)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine: do not lose the figures over a slow shutdown
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    RESULTS.mkdir(exist_ok=True)
    out_json = RESULTS / "dispatch_bench.json"
    history = json.loads(out_json.read_text()) if out_json.exists() else []
    history += results
    out_json.write_text(json.dumps(history, indent=1))
    lines = ["| label | db | messages | latency | processes x workers | dispatch msg/s "
             "| CPU ms/msg dispatcher + sandbox | ceiling msg/s (mix) | ratio | peak RSS MB | duplicates | load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['db']} | {r['messages']:,} | {r['latency_ms']:g} ms | "
              f"{r.get('processes', 1)} x {r['workers']} | {r['dispatch_msgs_per_s']:,} | "
              f"{r.get('dispatcher_cpu_ms_per_msg', '-')} + {r.get('sandbox_cpu_ms_per_msg', '-')} | "
              f"{r['ceiling_mixed_per_s']:,} | {r['ratio_to_ceiling']:.2f} | "
              f"{r['peak_rss_mb']} | {r['duplicates']} | {r['loadavg_1m_at_start']} |" for r in history]
    (RESULTS / "dispatch_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
