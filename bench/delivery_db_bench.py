"""Planning and dispatch throughput of the delivery engine on SQLite and PostgreSQL (no network).

Seeds N members (three consented channels, a live push token each), plans one marketing campaign with
the content of all three channels rendered per member (``fakes.simple_renderer``), then dispatches it
through in-process fake adapters that sleep ``--latency-ms`` per message. This isolates what the
database costs us; ``bench/dispatch_bench.py`` measures the whole path through the SDKs and the sandbox.

    .venv/bin/python bench/delivery_db_bench.py [--members 10000] [--latency-ms 50] [--workers 64]
        [--db sqlite|postgres|both] [--profile plan|dispatch]

PostgreSQL needs MEMBERCARE_TEST_POSTGRES_URL (a server where we may create and drop databases).
Writes bench/results/delivery_db_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test doubles (tests/fakes.py)

import sqlalchemy as sa

from fakes import FakeAdapter, seed_members, simple_renderer
from membercare.db import make_engine, upgrade
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.models import Channel, Purpose

RESULTS = Path(__file__).resolve().parent / "results"
NOPOLICY = PolicySettings(marketing_cap=None, quiet_hours=None)


@contextmanager
def fresh_database(kind: str):
    """A migrated, empty database URL that is removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            upgrade(url)
            yield url
        return
    admin = os.environ.get("MEMBERCARE_TEST_POSTGRES_URL")
    if not admin:
        raise SystemExit("set MEMBERCARE_TEST_POSTGRES_URL for the PostgreSQL run")
    name = f"mc_bench_{uuid.uuid4().hex[:8]}"
    admin_engine = make_engine(admin)
    with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_engine.dispose()


def seed_members_split(engine, n: int) -> list[int]:
    """``n`` members, a third each preferring email, SMS and push first (all consented, a live token each)."""
    ids: list[int] = []
    orders = ("email,sms,push", "sms,push,email", "push,email,sms")
    now = datetime.now(UTC)  # the bench plans and dispatches on the real clock
    with engine.begin() as conn:
        for k, preferred in enumerate(orders):
            part = n // 3 + (1 if k < n % 3 else 0)
            for i in range(0, part, 5000):
                ids += seed_members(conn, min(5000, part - i), preferred=preferred, now=now)
    return ids


def seed(engine, n: int) -> list[int]:
    ids: list[int] = []
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for i in range(0, n, 5000):
            ids += seed_members(conn, min(5000, n - i), now=now)
    return ids


def run_one(kind: str, members: int, latency_ms: float, workers: int, profile: str | None) -> dict:
    with fresh_database(kind) as url:
        engine = make_engine(url)
        ids = seed(engine, members)
        spec = PlanSpec("bench", "2026-11-23", Purpose.MARKETING, (Channel.EMAIL, Channel.SMS, Channel.PUSH))
        batches = [ids[i : i + 1000] for i in range(0, len(ids), 1000)]
        prof = cProfile.Profile() if profile == "plan" else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        rep = plan_run(engine, spec, batches, datetime.now(UTC), simple_renderer, policy=NOPOLICY)
        if prof:
            prof.disable()
        plan_s = time.perf_counter() - t0
        adapters = {ch: FakeAdapter(ch, latency=latency_ms / 1000) for ch in ("email", "sms", "push")}
        cfg = DispatchConfig(workers=workers, batch_size=max(200, workers * 4))
        prof2 = cProfile.Profile() if profile == "dispatch" else None
        t0 = time.perf_counter()
        if prof2:
            prof2.enable()
        drep = Dispatcher(engine, adapters, config=cfg, policy=NOPOLICY).dispatch(rep.run_id)
        if prof2:
            prof2.disable()
        dispatch_s = time.perf_counter() - t0
        engine.dispose()
        for p in (prof, prof2):
            if p:
                pstats.Stats(p).sort_stats("cumulative").print_stats(30)
        assert drep.outcomes["sent"] == members, drep.outcomes
        return {"db": kind, "members": members, "latency_ms": latency_ms, "workers": workers,
                "plan_s": round(plan_s, 2), "plan_per_s": round(members / plan_s),
                "dispatch_s": round(dispatch_s, 2), "dispatch_per_s": round(members / dispatch_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--profile", choices=("plan", "dispatch"))
    ap.add_argument("--label", default="", help="a tag for this run in the output (e.g. before/after)")
    args = ap.parse_args()
    kinds = ("sqlite", "postgres") if args.db == "both" else (args.db,)
    load = os.getloadavg()
    rows = [run_one(k, args.members, args.latency_ms, args.workers, args.profile) for k in kinds]
    for r in rows:
        r["label"] = args.label
        r["loadavg_1m_at_start"] = round(load[0], 2)
        print(json.dumps(r))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "delivery_db_bench.json"
    history = json.loads(out.read_text()) if out.exists() else []
    history += rows
    out.write_text(json.dumps(history, indent=1))
    lines = ["| label | db | members | plan members/s | dispatch msg/s (latency, workers) | load 1m |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.get('label', '')} | {r['db']} | {r['members']:,} | {r['plan_per_s']:,} | {r['dispatch_per_s']:,} "
              f"({r['latency_ms']:g} ms, {r['workers']}) | {r.get('loadavg_1m_at_start', '')} |" for r in history]
    (RESULTS / "delivery_db_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
