"""Benchmark: every standard segment and RFM scoring on generated shops, SQLite vs PostgreSQL vs DuckDB.

    .venv/bin/python bench/segments_bench.py --sizes 10000,100000,1000000 [--backends sqlite,postgres,duckdb]

For each shop size (members; the generator gives about five orders each) the script generates a shop
once per backend (cached in ``--workdir`` / PostgreSQL databases ``mc_bench_<n>``; ``--fresh`` to
regenerate), scores RFM (and BG/NBD churn, unless ``--skip-churn``), then counts every standard
segment, reporting seconds, members/s and the peak resident memory of this process during each step.

DuckDB is the reference for what the hardware can do: the SQLite shop (after scoring) is streamed into
a DuckDB database with a plain cursor (no DuckDB sqlite extension: it cannot be downloaded here) and
the *same segment builders* are compiled with the PostgreSQL dialect (literals inlined) and run by
DuckDB. The counts must agree across all three engines; the script says so when they do not.

PostgreSQL: ``MEMBERCARE_BENCH_POSTGRES_URL`` (else ``MEMBERCARE_TEST_POSTGRES_URL``) names a server
where the script may create databases.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from membercare.db import make_engine, upgrade
from segments import base
from segments.churn_scoring import score_churn
from segments.rfm import rfm_select, score_rfm
from segments.summary import AllOrdersContext

AS_OF = datetime(2026, 11, 23, 16, 0, tzinfo=UTC)  # midnight Nov 24 in the shop's zone (Asia/Taipei)
SHOP_TZ = "Asia/Taipei"


# --------------------------------------------------------------------------------------------
# Measurement


class Peak:
    """Peak RSS of this process while the block runs (sampled every 10 ms), in MB above the start."""

    def __init__(self):
        self.proc = psutil.Process()

    def __enter__(self):
        self.start_rss = self.proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        # CPU of this process (all threads: DuckDB's workers count): fairer than wall on a shared machine.
        self.cpu_seconds = time.process_time() - self.cpu0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_mb = self.peak / 2**20
        self.delta_mb = (self.peak - self.start_rss) / 2**20


# --------------------------------------------------------------------------------------------
# Shops


ONLY: set[str] | None = None  # --only: the steps to run (rfm steps and segment names), for iterating


def _segments(conn) -> list[tuple[str, base.Segment]]:
    """Every standard segment, with parameters chosen from the shop's own data where needed."""
    cat = conn.execute(sa.text("SELECT category FROM order_lines GROUP BY category "
                               "ORDER BY count(*) DESC LIMIT 1")).scalar()
    reg = conn.execute(sa.text("SELECT region FROM members WHERE region IS NOT NULL GROUP BY region "
                               "ORDER BY count(*) DESC LIMIT 1")).scalar()
    params = {"category_affinity": {"category": cat or "none"}, "region": {"region": reg or "none"},
              "new_members": {"days": 30}}
    # high_value_at_risk fits models in Python and fills a temporary table through SQLAlchemy: not for DuckDB.
    python_side = {"high_value_at_risk"} if isinstance(conn, DuckConnection) else set()
    out = [(d.name, base.ref(d.name, **params.get(d.name, {}))) for d in base.definitions()
           if d.name not in python_side]
    out.append(("new_members(day=3)", base.ref("new_members", day=3)))
    out.append(("birthday_today(days_ahead=7)", base.ref("birthday_today", days_ahead=7)))
    return [(name, seg) for name, seg in out if ONLY is None or name in ONLY]


def _member_count(engine) -> int | None:
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM members")).scalar()
    except sa.exc.DBAPIError:
        return None


def _generate(url: str, n: int, seed: int, fresh: bool) -> tuple[sa.Engine, float | None]:
    from membercare.data.generator import generate_shop

    upgrade(url)
    engine = make_engine(url)
    if not fresh and _member_count(engine) == n:
        return engine, None
    print(f"  generating {n:,} members into {url.rsplit('/', 1)[-1]} ...", flush=True)
    t0 = time.perf_counter()
    summary = generate_shop(engine, members=n, seed=seed, as_of=AS_OF, replace=True, batch_size=20_000)
    secs = time.perf_counter() - t0
    print(f"  generated in {secs:.0f} s: {summary.counts}", flush=True)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE")
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    return engine, secs


def _pg_url(admin: str, n: int) -> str:
    name = f"mc_bench_{n}"
    eng = make_engine(admin)
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar():
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng.dispose()
    return sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)


# --------------------------------------------------------------------------------------------
# DuckDB reference: the same segment SQL, compiled for PostgreSQL, run by DuckDB


class _DuckResult:
    def __init__(self, cur):
        self.keys = [d[0] for d in cur.description] if cur.description else []
        self.rows = cur.fetchall() if cur.description else []

    def __iter__(self):
        return iter(self.rows)

    def all(self):
        return self.rows

    def scalar(self):
        return self.rows[0][0] if self.rows else None

    def scalar_one(self):
        (row,) = self.rows
        return row[0]

    def mappings(self):
        return [dict(zip(self.keys, r, strict=True)) for r in self.rows]


class DuckConnection:
    """Just enough of a SQLAlchemy Connection for SegmentContext: compiles statements, DuckDB runs them."""

    def __init__(self, duck):
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        class _DuckDialect(PGDialect_psycopg):
            name = "duckdb"

        self.duck = duck
        self.dialect = _DuckDialect()

    def sql(self, stmt) -> str:
        if isinstance(stmt, str):
            return stmt
        # psycopg's pyformat paramstyle doubles literal '%'; with every value inlined there are no params.
        return str(stmt.compile(dialect=self.dialect, compile_kwargs={"literal_binds": True})).replace("%%", "%")

    def execute(self, stmt, *args, **kw):
        return _DuckResult(self.duck.execute(self.sql(stmt)))


_DUCK_TYPES = {"INTEGER": "BIGINT", "BIGINT": "BIGINT", "FLOAT": "DOUBLE", "BOOLEAN": "BOOLEAN", "DATE": "DATE"}
_TABLES = ("members", "orders", "order_lines", "coupons", "tiers", "tier_history", "rfm_scores",
           "churn_model_fits", "churn_scores", "order_summary", "products", "member_events")


def load_duckdb(sqlite_path: Path, duck_path: Path, workdir: Path) -> float:
    """Stream the SQLite shop into DuckDB (CSV per table, read by DuckDB's native reader)."""
    import duckdb
    from sqlmodel import SQLModel

    import membercare.journeys.models
    import membercare.models
    import membercare.scoring_models  # noqa: F401

    t0 = time.perf_counter()
    duck_path.unlink(missing_ok=True)
    duck = duckdb.connect(str(duck_path))
    duck.execute("SET TimeZone = 'UTC'")  # SQLite stores naive UTC text
    src = sqlite3.connect(str(sqlite_path))
    for name in _TABLES:
        table = SQLModel.metadata.tables[name]
        cols, defs, bools = [], [], []
        for c in table.columns:
            tname = c.type.__class__.__name__.upper()
            if tname == "UTCDATETIME":
                dt = "TIMESTAMPTZ"
            else:
                dt = _DUCK_TYPES.get(str(c.type.compile(dialect=sa.dialects.sqlite.dialect())).split("(")[0], "VARCHAR")
            cols.append(c.name)
            defs.append(f'"{c.name}" {dt}')
            if dt == "BOOLEAN":
                bools.append(len(cols) - 1)
        duck.execute(f'CREATE TABLE "{name}" ({", ".join(defs)})')
        path = workdir / f"{name}.csv"
        cur = src.execute(f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{name}"')
        rows = 0
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            while True:
                part = cur.fetchmany(50_000)
                if not part:
                    break
                rows += len(part)
                if bools:
                    part = [tuple(("true" if v else "false") if i in bools and v is not None else v
                                  for i, v in enumerate(r)) for r in part]
                w.writerows(part)
        if rows:  # DuckDB refuses to read an empty file (e.g. no churn scores under --skip-churn)
            duck.execute(f"COPY \"{name}\" FROM '{path}' (FORMAT csv, HEADER false, NULLSTR '')")
        path.unlink()
    src.close()
    duck.close()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------


def run_backend(label: str, conn_factory, n: int, *, skip_churn: bool, repeat: int = 1,
                context: type[base.SegmentContext] = base.SegmentContext) -> dict:
    """Score and count on one backend; returns {step: {seconds, count, peak_mb}}.

    Segment counts run ``repeat`` times; ``seconds`` is the best run (warm cache), ``first_seconds``
    the first one (cold pages right after generation or scoring). ``context`` is
    :class:`segments.summary.AllOrdersContext` for the reference that aggregates every order.
    "rfm compute" counts the scoring query's rows without storing them (like for like with DuckDB).
    """
    out: dict[str, dict] = {}
    with conn_factory() as conn:
        computes = []
        for _ in range(repeat):
            query = sa.select(sa.func.count()).select_from(rfm_select(context(conn, AS_OF, SHOP_TZ)).subquery())
            with Peak() as p:
                scored = conn.execute(query).scalar()
            computes.append(p)
        out["rfm compute"] = {"seconds": min(r.seconds for r in computes),
                              "cpu_seconds": min(r.cpu_seconds for r in computes), "count": scored,
                              "peak_mb": max(r.peak_mb for r in computes)}
        if label.startswith("duckdb"):
            ctx = context(conn, AS_OF, SHOP_TZ)
            with Peak() as p:
                conn.execute(f"CREATE OR REPLACE TEMP TABLE rfm_bench AS {conn.sql(rfm_select(ctx))}")
            scored = conn.execute("SELECT count(*) FROM rfm_bench").scalar()
            out["rfm score"] = {"seconds": p.seconds, "cpu_seconds": p.cpu_seconds, "count": scored,
                                "peak_mb": p.peak_mb}
        elif context is base.SegmentContext:  # scoring reads the summary; the all-orders variant only computes
            with Peak() as p:
                run = score_rfm(conn, AS_OF, shop_timezone=SHOP_TZ)
                conn.commit()
            out["rfm score"] = {"seconds": p.seconds, "cpu_seconds": p.cpu_seconds, "count": run.scored,
                                "peak_mb": p.peak_mb}
            if not skip_churn:
                with Peak() as p:
                    crun = score_churn(conn, AS_OF, shop_timezone=SHOP_TZ)
                    conn.commit()
                out["churn score"] = {"seconds": p.seconds, "count": crun.scored, "peak_mb": p.peak_mb,
                                      "note": f"{crun.distinct_rows:,} distinct (x,t_x,T)"}
        for name, seg in _segments(conn):
            runs = []
            for _ in range(repeat):
                ctx = context(conn, AS_OF, SHOP_TZ)
                with Peak() as p:
                    count = base.count(ctx, seg)
                runs.append(p)
            best = min(runs, key=lambda r: r.seconds)
            out[name] = {"seconds": best.seconds, "first_seconds": runs[0].seconds,
                         "cpu_seconds": min(r.cpu_seconds for r in runs), "count": count,
                         "peak_mb": max(r.peak_mb for r in runs)}
            print(f"    {label:8} {name:32} {count:>9,} {best.seconds:8.2f} s (first run {runs[0].seconds:.2f} s)",
                  flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--backends", default="sqlite,postgres,duckdb")
    ap.add_argument("--workdir", default=os.environ.get("MEMBERCARE_BENCH_DIR", "/tmp/membercare-bench"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="regenerate shops even if cached")
    ap.add_argument("--skip-churn", action="store_true")
    ap.add_argument("--sqlite-raw", action="store_true",
                    help="also run SQLite on the all-orders SQL (without order_summary), for before/after")
    ap.add_argument("--repeat", type=int, default=2, help="runs per segment count; the best is reported")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--only", help="comma-separated segment names to count (default: all)")
    args = ap.parse_args(argv)
    global ONLY
    ONLY = set(args.only.split(",")) if args.only else None
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backends = args.backends.split(",")
    pg_admin = os.environ.get("MEMBERCARE_BENCH_POSTGRES_URL") or os.environ.get("MEMBERCARE_TEST_POSTGRES_URL")
    if "postgres" in backends and not pg_admin:
        print("no PostgreSQL URL (MEMBERCARE_BENCH_POSTGRES_URL): skipping postgres")
        backends.remove("postgres")
    results: dict = {"as_of": AS_OF.isoformat(), "sizes": {}}
    for n in [int(s) for s in args.sizes.split(",")]:
        print(f"== {n:,} members", flush=True)
        res: dict = {}
        sqlite_path = workdir / f"shop_{n}.db"
        gen: dict = {}
        if "sqlite" in backends or "duckdb" in backends:
            eng, gen["sqlite"] = _generate(f"sqlite:///{sqlite_path}", n, args.seed, args.fresh)
            res["sqlite"] = run_backend("sqlite", eng.connect, n, skip_churn=args.skip_churn, repeat=args.repeat)
            if args.sqlite_raw:  # the queries before order_summary, same run: the before/after comparison
                res["sqlite_raw"] = run_backend("sqlite_raw", eng.connect, n, skip_churn=True, repeat=args.repeat,
                                                context=AllOrdersContext)
            eng.dispose()
        if "postgres" in backends:
            eng, gen["postgres"] = _generate(_pg_url(pg_admin, n), n, args.seed, args.fresh)
            res["postgres"] = run_backend("postgres", eng.connect, n, skip_churn=args.skip_churn, repeat=args.repeat)
            eng.dispose()
        if "duckdb" in backends:
            import duckdb

            load_s = load_duckdb(sqlite_path, workdir / f"shop_{n}.duckdb", workdir)
            print(f"  loaded into DuckDB in {load_s:.1f} s", flush=True)
            duck = duckdb.connect(str(workdir / f"shop_{n}.duckdb"))
            duck.execute("SET TimeZone = 'UTC'")

            class _Ctx:
                def __enter__(self_inner, duck=duck):
                    return DuckConnection(duck)

                def __exit__(self_inner, *exc):
                    return False

            res["duckdb"] = run_backend("duckdb", _Ctx, n, skip_churn=True, repeat=args.repeat)
            # DuckDB folding every order itself (the SQL before order_summary): the hardware reference.
            res["duckdb_raw"] = run_backend("duckdb_raw", _Ctx, n, skip_churn=True, repeat=args.repeat,
                                            context=AllOrdersContext)
            duck.close()
        results["sizes"][n] = {"generation_seconds": gen, "results": res}
        _report(n, res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


# (column, numerator engine, denominator engine, measure): wall ratios, then CPU ratios.
_RATIOS = (("sqlite/duck", "sqlite", "duckdb", "seconds"), ("/duck_raw", "sqlite", "duckdb_raw", "seconds"),
           ("cpu:/duck", "sqlite", "duckdb", "cpu_seconds"), ("/duck_raw", "sqlite", "duckdb_raw", "cpu_seconds"),
           ("raw:cpu/raw", "sqlite_raw", "duckdb_raw", "cpu_seconds"))


def _ratio(res: dict, step: str, num: str, den: str, key: str) -> str:
    a, b = res.get(num, {}).get(step), res.get(den, {}).get(step)
    if not a or not b or a.get(key) is None or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.1f}"


def _report(n: int, res: dict) -> None:
    """A table per size: seconds and peak MB per engine, then ratios (wall and CPU; ``raw`` = all-orders SQL)."""
    engines = list(res)
    steps = list(dict.fromkeys(s for e in engines for s in res[e]))
    head = (f"{'step':32}" + "".join(f"{e + ' s':>14}{'MB':>7}" for e in engines)
            + "".join(f"{label:>12}" for label, *_ in _RATIOS) + f"{'members/s (sqlite)':>20}  counts")
    print(f"\n-- {n:,} members\n{head}")
    for s in steps:
        line = f"{s:32}"
        for e in engines:
            r = res[e].get(s)
            line += f"{r['seconds']:14.2f}{r['peak_mb']:7.0f}" if r else f"{'-':>14}{'':>7}"
        line += "".join(f"{_ratio(res, s, *spec[1:]):>12}" for spec in _RATIOS)
        sq = res.get("sqlite", {}).get(s)
        line += f"{n / sq['seconds']:20,.0f}" if sq and sq["seconds"] > 0 else f"{'-':>20}"
        counts = {e: res[e][s]["count"] for e in engines if s in res[e]}
        same = len(set(counts.values())) <= 1
        line += f"  {next(iter(counts.values())):,}" if same else f"  MISMATCH {counts}"
        print(line)
    for e in engines:
        for s, r in res[e].items():
            if r.get("note"):
                print(f"  {e} {s}: {r['note']}")
    print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
