"""Benchmark the demo shop generator: wall seconds, CPU seconds and peak RSS per shop size.

Each size runs in a fresh Python process (so that peak RSS is that run's own) against a fresh,
migrated database: a temporary SQLite file, or with ``--postgres URL`` a temporary database created
on that server (``URL`` names a database we may connect to for ``CREATE DATABASE``).

    .venv/bin/python bench/generate_bench.py                   # 10k and 100k members on SQLite
    .venv/bin/python bench/generate_bench.py --million         # ... and 1M
    .venv/bin/python bench/generate_bench.py --sizes 100000 --postgres postgresql://postgres@127.0.0.1:5432/test

Targets (issue): 100k members (about 500k orders) in under a minute on SQLite on a 2-core machine;
1M members in bounded memory. CPU seconds are printed next to wall seconds because a shared machine's
load inflates wall time; the load average at the start is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys, time
from datetime import datetime, timezone
sys.path.insert(0, {root!r})
from membercare.db import make_engine, upgrade
from membercare.data.generator import generate_shop

url, members, seed, batch = {url!r}, {members}, {seed}, {batch}
upgrade(url)
engine = make_engine(url)
wall, cpu = time.perf_counter(), time.process_time()
summary = generate_shop(engine, members=members, seed=seed, as_of=datetime(2026, 3, 10, 16, tzinfo=timezone.utc),
                        batch_size=batch)
print(json.dumps(dict(
    members=members, wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, counts=summary.counts,
)))
"""


def _run(url: str, members: int, seed: int, batch: int) -> dict:
    code = _CHILD.format(root=str(ROOT), url=url, members=members, seed=seed, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pg_database(admin_url: str):
    import sqlalchemy as sa

    from membercare.db import make_engine

    name = f"mc_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(admin_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url, drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated member counts")
    ap.add_argument("--million", action="store_true", help="also run 1,000,000 members")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--postgres", metavar="URL", help="run on a temporary database of this PostgreSQL server")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million:
        sizes.append(1_000_000)
    sys.path.insert(0, str(ROOT))
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'backend':<10} {'members':>10} {'orders':>10} {'rows':>11} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12}")
    for n in sizes:
        if args.postgres:
            url, cleanup = _pg_database(args.postgres)
            backend = "postgresql"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mc-genbench-")
            url, cleanup, backend = f"sqlite:///{tmp.name}/shop.db", tmp.cleanup, "sqlite"
        try:
            r = _run(url, n, args.seed, args.batch_size)
        finally:
            cleanup()
        rows = sum(r["counts"].values())
        print(f"{backend:<10} {n:>10,} {r['counts']['orders']:>10,} {rows:>11,} {r['wall']:>8.1f} {r['cpu']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
