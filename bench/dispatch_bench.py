"""End-to-end dispatch throughput through the real SDKs against the provider sandbox, next to the ceiling.

For each configuration (messages x provider latency x database) the benchmark seeds a fresh database
(a third of the members each preferring email, SMS and push; all consented, one live push token each),
plans one marketing campaign (content of all three channels rendered per member) and times
``--processes`` dispatcher processes (started and ready before the clock starts) sending it through the
three real adapters (sendgrid, twilio, firebase-admin) to ``membercare sandbox`` in its own process. Reported per configuration: messages/s of dispatch (claim to recorded outcome), the peak RSS of
the dispatching process, and the ratio to the ceiling: the raw request rate a minimal keep-alive
client (``bench/sandbox_ceiling.py``) reaches against the same sandbox, weighted by the channel mix.

    .venv/bin/python bench/dispatch_bench.py [--messages 10000 100000] [--latency-ms 0 50]
        [--db sqlite postgres] [--workers 128] [--processes 1] [--ceiling-seconds 4]

PostgreSQL needs MEMBERCARE_TEST_POSTGRES_URL. Writes bench/results/dispatch_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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
    cfg = DispatchConfig(workers=args.workers, batch_size=args.batch_size, flush_every=200)
    dispatcher = Dispatcher(engine, adapters, config=cfg, policy=PolicySettings(marketing_cap=None, quiet_hours=None))
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    rep = dispatcher.dispatch(args.run_id, resume=True)
    elapsed = time.perf_counter() - t0
    close_channels(adapters)
    engine.dispose()
    print(json.dumps({"sent": rep.outcomes["sent"], "outcomes": dict(rep.outcomes), "elapsed": elapsed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def run_configuration(db: str, n: int, args, env: dict[str, str]) -> dict:
    """Seed and plan in this process, then time ``args.processes`` dispatcher processes on the run."""
    from delivery_db_bench import fresh_database, seed_members_split

    from membercare.db import make_engine
    from membercare.delivery.fakes import simple_renderer
    from membercare.delivery.planner import PlanSpec, plan_run
    from membercare.delivery.policies import PolicySettings
    from membercare.models import Channel, Purpose

    with fresh_database(db) as url:
        engine = make_engine(url)
        ids = seed_members_split(engine, n)
        t0 = time.perf_counter()
        spec = PlanSpec("bench", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL, Channel.SMS, Channel.PUSH))
        rep = plan_run(engine, spec, [ids[i : i + 2000] for i in range(0, len(ids), 2000)],
                       datetime.now(timezone.utc), simple_renderer,
                       policy=PolicySettings(marketing_cap=None, quiet_hours=None))
        plan_s = time.perf_counter() - t0
        engine.dispose()
        cmd = [sys.executable, __file__, "--dispatcher", "--url", url, "--run-id", str(rep.run_id),
               "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
        procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(args.processes)]
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"dispatcher did not start: {line!r} {p.stderr.read()[-3000:]}")
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate() for p in procs]
        wall = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            raise SystemExit("\n".join(o[1][-3000:] for o in outs))
        reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    return {"plan_s": plan_s, "dispatch_s": wall, "sent": sum(r["sent"] for r in reports),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
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
    ap.add_argument("--label", default="")
    ap.add_argument("--dispatcher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dispatcher:
        return dispatcher_process(args)

    from sandbox_ceiling import start_sandbox

    proc, url = start_sandbox(0.0)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sa_path = make_service_account(Path(tmp), url + "/token")
            env = {**os.environ, **sandbox_env(url, sa_path), "PYTHONPATH": str(ROOT)}
            env.pop("MEMBERCARE_PUBLIC_URL", None)  # no status callbacks: nobody listens in a benchmark
            for latency in args.latency_ms:
                configure_sandbox(url, latency)
                ceiling = measure_ceiling(url, args.ceiling_seconds,
                                          max(args.ceiling_concurrency, args.processes * args.workers if latency else 0))
                for db in args.db:
                    for n in args.messages:
                        configure_sandbox(url, latency)
                        load = os.getloadavg()[0]
                        r = run_configuration(db, n, args, env)
                        import httpx

                        stats = httpx.get(url + "/sandbox/stats").json()
                        row = {"label": args.label, "db": db, "messages": n, "latency_ms": latency,
                               "workers": args.workers, "processes": args.processes, "sent": r["sent"],
                               "sent_per_process": r["sent_per_process"],
                               "dispatch_msgs_per_s": round(n / r["dispatch_s"]),
                               "plan_members_per_s": round(n / r["plan_s"]),
                               "peak_rss_mb": round(r["peak_rss_mb"]),
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
        proc.wait(10)
    RESULTS.mkdir(exist_ok=True)
    out_json = RESULTS / "dispatch_bench.json"
    history = json.loads(out_json.read_text()) if out_json.exists() else []
    history += results
    out_json.write_text(json.dumps(history, indent=1))
    lines = ["| label | db | messages | latency | processes x workers | dispatch msg/s | ceiling msg/s (mix) | ratio | peak RSS MB "
             "| duplicates | load 1m |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['db']} | {r['messages']:,} | {r['latency_ms']:g} ms | {r['workers']} | "
              f"{r['dispatch_msgs_per_s']:,} | {r['ceiling_mixed_per_s']:,} | {r['ratio_to_ceiling']:.2f} | "
              f"{r['peak_rss_mb']} | {r['duplicates']} | {r['loadavg_1m_at_start']} |" for r in history]
    (RESULTS / "dispatch_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
