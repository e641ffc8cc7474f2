"""Planning + rendering throughput of a whole campaign run on a generated shop (issue 8 target).

Generates (once, cached) a demo shop of N members, then plans the ``birthday`` campaign (email, SMS and
push, an offer coupon per member, the content of every channel of each member's fallback chain rendered
and stored) for an audience of *everyone* (the segment is swapped for ``new_members(days=3650)``), through
:func:`membercare.campaigns.run.run_campaign` without adapters: prepare, resolve the segment, plan every group.
Nothing is sent. Reports members/s, rendered messages/s, CPU seconds (parent and render processes),
peak RSS of the whole process tree and, at 1M members, the time against the 2-minute target.

    .venv/bin/python bench/plan_bench.py --sizes 10000,100000 [--processes 0,2] [--db sqlite|postgres]
    .venv/bin/python bench/plan_bench.py --sizes 1000000 --processes 2          # the issue's target
    .venv/bin/python bench/plan_bench.py --sizes 10000 --profile               # cProfile of the parent

Shops are cached as SQLite files under ``--cache`` (default /tmp/plan-perf/; 1M members take 10-16 min
to generate) and copied for each run, so every run starts from the same unplanned shop. PostgreSQL
(``--db postgres``, needs MEMBERCARE_TEST_POSTGRES_URL) caches the shop as a template database
``mc_plan_bench_shop_<N>`` and clones it per run. Results are appended to bench/results/plan_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SEED = 7
TARGET_S = 120.0

# The shop's "now" and the run's as_of: 10:00 in Taipei, outside quiet hours, so planned rows are due now.
SHOP_AS_OF = "2026-11-23T01:00:00+00:00"
RUN_AS_OF = "2026-11-23T02:00:00+00:00"

_GENERATE = r"""
import os, sys, time
from datetime import datetime
sys.path.insert(0, {root!r})
from membercare.db import make_engine, upgrade
from membercare.data.generator import generate_shop
url, members = {url!r}, {members}
upgrade(url)
engine = make_engine(url)
t = time.perf_counter()
generate_shop(engine, members=members, seed={seed}, as_of=datetime.fromisoformat({as_of!r}))
engine.dispose()
print("generated", members, "members in", round(time.perf_counter() - t, 1), "s", file=sys.stderr)
"""

_RUN = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
import psutil
from datetime import datetime
import sqlalchemy as sa
from membercare.config import Settings
from membercare.campaigns import SegmentRef, load_campaign
from membercare.db import make_engine, upgrade
from membercare.campaigns.occurrence import RunOptions
from membercare.campaigns.plan import shutdown_planning_pools
from membercare.campaigns.run import run_campaign
from membercare.delivery.models import OutboxMessage

url, processes, profile = {url!r}, {processes}, {profile}
upgrade(url)  # a cached shop from before a newer migration
settings = Settings(database_url=url, secret_key="plan-bench-secret", home={home!r})
camp = load_campaign("birthday", settings)
camp = camp.model_copy(update={{"segment": SegmentRef(name="new_members", params={{"days": 3650}})}})
options = RunOptions(as_of=datetime.fromisoformat({as_of!r}),
                     **({{"processes": processes}} if processes is not None else {{}}))
engine = make_engine(url)

me = psutil.Process()
peak = {{"rss": 0}}
child_cpu = {{}}  # pid -> CPU seconds of the render workers (alive until the pool is shut down)
stop = threading.Event()

def sample_once():
    rss = me.memory_info().rss
    for p in me.children(recursive=True):
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            child_cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    peak["rss"] = max(peak["rss"], rss)

def sample():
    while not stop.is_set():
        sample_once()
        stop.wait(0.2)

threading.Thread(target=sample, daemon=True).start()
prof = None
if profile:
    import cProfile
    prof = cProfile.Profile()
load0 = os.getloadavg()[0]
t0, c0 = time.perf_counter(), os.times()
if prof:
    prof.enable()
result = run_campaign(engine, settings, camp, options)
if prof:
    prof.disable()
wall = time.perf_counter() - t0
c1 = os.times()
stop.set()
sample_once()
shutdown_planning_pools()
o = OutboxMessage.__table__
with engine.connect() as conn:
    rows = conn.execute(sa.select(o.c.state, o.c.fallback_channels, o.c.content.is_not(None))
                        .where(o.c.campaign == camp.name)).all()
rendered = sum(1 + (len(f.split(",")) if f else 0) for s, f, has in rows if has)
messages = sum(1 for s, f, has in rows if has)
engine.dispose()
if prof:
    import pstats
    pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
print(json.dumps(dict(
    members=result.summary.segment_size, rows=len(rows), messages=messages, rendered=rendered, wall_s=round(wall, 2),
    cpu_parent_s=round((c1.user - c0.user) + (c1.system - c0.system), 1),
    cpu_children_s=round(sum(child_cpu.values()), 1),
    peak_rss_mb=round(peak["rss"] / 2**20), loadavg_1m_at_start=round(load0, 2),
    by_state=result.plan.by_state if result.plan else {{}},
)))
"""


def sqlite_shop(cache: Path, members: int) -> Path:
    path = cache / f"shop-{members}.db"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.unlink(missing_ok=True)
        print(f"generating a {members:,}-member shop into {path} (cached for later runs)...", file=sys.stderr)
        code = _GENERATE.format(root=str(ROOT), url=f"sqlite:///{part}", members=members, seed=SEED, as_of=SHOP_AS_OF)
        subprocess.run([sys.executable, "-c", code], check=True)
        part.rename(path)
    return path


def postgres_shop(admin_url: str, members: int):
    """A fresh clone of the cached template database of an N-member shop; returns (url, drop)."""
    import uuid

    import sqlalchemy as sa

    from membercare.db import make_engine

    admin = make_engine(admin_url)
    template = f"mc_plan_bench_shop_{members}"

    def url_of(name: str) -> str:
        return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        exists = c.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (template,)).first()
    if not exists:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(f'CREATE DATABASE "{template}"')
        print(f"generating a {members:,}-member shop into PostgreSQL database {template}...", file=sys.stderr)
        code = _GENERATE.format(root=str(ROOT), url=url_of(template), members=members, seed=SEED, as_of=SHOP_AS_OF)
        try:
            subprocess.run([sys.executable, "-c", code], check=True)
        except BaseException:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
            raise
    name = f"mc_plan_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def drop() -> None:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url_of(name), drop


def run_one(db: str, members: int, processes: int | None, cache: Path, profile: bool) -> dict:
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    drop = None
    if db == "sqlite":
        src = sqlite_shop(cache, members)
        dst = work / f"run-{members}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{dst}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(src, dst)
        url = f"sqlite:///{dst}"
    else:
        admin = os.environ.get("MEMBERCARE_TEST_POSTGRES_URL")
        if not admin:
            raise SystemExit("set MEMBERCARE_TEST_POSTGRES_URL for --db postgres")
        url, drop = postgres_shop(admin, members)
    try:
        code = _RUN.format(root=str(ROOT), url=url, processes=processes, profile=profile, as_of=RUN_AS_OF,
                           home=str(work / "home"))
        out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if drop:
            drop()
        elif db == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{dst}{suffix}").unlink(missing_ok=True)
    res.update(db=db, processes=processes, members_per_s=round(res["members"] / res["wall_s"]),
               messages_per_s=round(res["messages"] / res["wall_s"]),
               rendered_per_s=round(res["rendered"] / res["wall_s"]))
    if members >= 1_000_000:
        res["target"] = f"{res['wall_s']:.0f} s vs {TARGET_S:.0f} s: {'met' if res['wall_s'] < TARGET_S else 'MISSED'}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated member counts")
    ap.add_argument("--processes", default="default",
                    help="comma-separated render-process counts to compare (0 = render in the planning process; "
                         "'default' = RunOptions' default)")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/plan-perf"), help="where generated shops are cached")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the planning process (stderr)")
    ap.add_argument("--label", default="", help="a tag for this run in the output (e.g. before/after)")
    args = ap.parse_args()
    procs = [None if p == "default" else int(p) for p in args.processes.split(",")]
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for p in procs:
            r = run_one(args.db, size, p, args.cache, args.profile)
            r["label"] = args.label
            print(json.dumps(r), flush=True)
            rows.append(r)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "plan_bench.json"
    history = json.loads(out.read_text()) if out.exists() else []
    history += rows
    out.write_text(json.dumps(history, indent=1))
    lines = ["| label | db | members | processes | wall s | members/s | messages/s | rendered/s "
             "| CPU parent+children s | peak RSS MB | load 1m |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.get('label', '')} | {r['db']} | {r['members']:,} "
              f"| {r['processes'] if r['processes'] is not None else 'default'} "
              f"| {r['wall_s']} | {r['members_per_s']:,} | {r['messages_per_s']:,} | {r['rendered_per_s']:,} "
              f"| {r['cpu_parent_s']}+{r['cpu_children_s']} | {r['peak_rss_mb']} | {r['loadavg_1m_at_start']} |"
              for r in history]
    (RESULTS / "plan_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
