"""Journey advancing throughput: N waiting instances, 10 % of them due, advanced until nothing is due.

Builds a fresh database with N members (email consent) and N instances of a bench journey, bulk-inserted:
90 % wait an hour more, 10 % are due now. Two kinds of due work (``--mode``):

* ``wait``: the due instances finish a wait and start the next one (one claim each): the advancer's own cost
  (claim, exit checks, step log, write back);
* ``send``: the due instances are at a send step: the email is planned through the campaign planner (routing,
  policies, rendering, the outbox insert) in the batch's transaction, then the instance starts waiting for a
  click (two claims each).

Reports due instances advanced per second, the wall time, and the peak RSS of the process (sampled every
50 ms; the database server's memory is not included). Nothing is sent to a provider.

    .venv/bin/python bench/journeys_advance.py --n 100000 [--mode wait,send] [--db sqlite|postgres]
        [--batch-size 500]

``--db postgres`` needs MEMBERCARE_TEST_POSTGRES_URL and creates (then drops) a database of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from membercare.config import Settings  # noqa: E402
from membercare.db import make_engine, upgrade  # noqa: E402
from membercare.delivery.policies import PolicySettings  # noqa: E402
from membercare.journeys.advance import Advancer  # noqa: E402
from membercare.journeys.models import JourneyInstance  # noqa: E402
from membercare.models import Consent, Member  # noqa: E402

NOW = datetime(2026, 11, 23, 4, tzinfo=UTC)  # 12:00 in Asia/Taipei
JOURNEY = """\
description: Benchmark journey.
entry: {event: bench.start}
steps:
  - {id: w1, wait: {duration: 1h}}
  - {id: w2, wait: {duration: 1d}}
  - {id: email, send: {message: bench_email}}
  - {id: wf, wait_for: {event: clicked, timeout: 24h, then: end}}
"""
CHUNK = 20_000


def templates(tmp: Path) -> Path:
    root = tmp / "templates"
    shutil.copytree(ROOT / "templates" / "_layout", root / "_layout")
    shutil.copytree(ROOT / "templates" / "abandoned_cart_email", root / "bench_email")
    camp = root / "bench_email" / "campaign.yaml"
    text = camp.read_text(encoding="utf-8").replace("name: abandoned_cart_email", "name: bench_email")
    camp.write_text(text.replace("journey.abandoned_cart", "journey.bench_journey"), encoding="utf-8")
    (root / "bench_journey").mkdir()
    (root / "bench_journey" / "journey.yaml").write_text(JOURNEY, encoding="utf-8")
    return root


def populate(engine, n: int, mode: str) -> int:
    m, c, t = Member.__table__, Consent.__table__, JourneyInstance.__table__
    due_step = "w1" if mode == "wait" else "email"
    due = 0
    with engine.begin() as conn:
        for start in range(0, n, CHUNK):
            ids = range(start + 1, min(n, start + CHUNK) + 1)
            conn.execute(sa.insert(m), [dict(id=i, external_id=f"B{i:08d}", name=f"Bench {i}",
                                             email=f"b{i}@example.test", joined_at=NOW - timedelta(days=30),
                                             created_at=NOW, updated_at=NOW, preferred_channels="email")
                                        for i in ids])
            conn.execute(sa.insert(c), [dict(member_id=i, channel="email", purpose="marketing", granted=True,
                                             source="import", changed_at=NOW - timedelta(days=1)) for i in ids])
            rows = []
            for i in ids:
                is_due = i % 10 == 0
                due += is_due
                rows.append(dict(journey="bench_journey", member_id=i, entry_key=f"b{i}", active_key=i,
                                 status="active", step=due_step if is_due else "w1",
                                 step_started_at=NOW - timedelta(hours=1) if (is_due and mode == "wait") or not is_due
                                 else None,
                                 due_at=NOW - timedelta(seconds=1) if is_due else NOW + timedelta(minutes=1 + i % 60),
                                 entered_at=NOW - timedelta(hours=1), context="{}", updated_at=NOW))
            conn.execute(sa.insert(t), rows)
    return due


def run(url: str, n: int, mode: str, batch_size: int, tmp: Path) -> dict:
    upgrade(url)
    engine = make_engine(url)
    t0 = time.perf_counter()
    due = populate(engine, n, mode)
    populate_s = time.perf_counter() - t0
    settings = Settings(database_url=url, home=tmp / "home", secret_key="journey-bench-" + "x" * 20,
                        templates_dir=templates(tmp / mode))
    proc, peak, stop = psutil.Process(), {"rss": 0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_before = proc.memory_info().rss
    sampler.start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    rep = Advancer(engine, settings, clock=lambda: NOW, batch_size=batch_size,
                   policy=PolicySettings(marketing_cap=None)).advance()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    sampler.join()
    engine.dispose()
    return {"db": url.split(":")[0], "n": n, "due": due, "mode": mode, "batch_size": batch_size,
            "claims": rep.claimed, "steps": dict(rep.steps), "sends": dict(rep.sends),
            "populate_s": round(populate_s, 1), "advance_s": round(elapsed, 2), "cpu_s": round(cpu, 2),
            "due_per_s": round(due / elapsed, 1), "rss_before_mb": round(rss_before / 2**20),
            "peak_rss_mb": round(max(peak["rss"], rss_before) / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--mode", default="wait,send")
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    for mode in args.mode.split(","):
        with tempfile.TemporaryDirectory(prefix="journey-bench-") as d:
            tmp = Path(d)
            if args.db == "sqlite":
                print(json.dumps(run(f"sqlite:///{tmp / 'bench.db'}", args.n, mode, args.batch_size, tmp)))
                continue
            admin = os.environ["MEMBERCARE_TEST_POSTGRES_URL"]
            name = f"mc_journey_bench_{uuid.uuid4().hex[:8]}"
            admin_engine = make_engine(admin)
            with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            try:
                url = sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)
                print(json.dumps(run(url, args.n, mode, args.batch_size, tmp)))
            finally:
                with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                admin_engine.dispose()


if __name__ == "__main__":
    main()
