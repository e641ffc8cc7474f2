"""Memory and time of resolving a campaign audience as a list versus as a database snapshot.

    ./run python bench/audience_memory.py --members 100000 [--db sqlite:///shop.db] [--campaign churn_winback]

Generates the shop (or reuses the database given), then resolves the campaign's segment audience both ways
and prints JSON (each way run twice, alternating, the second kept): members, entries, wall seconds and the
Python heap peak (tracemalloc) of each way, and the time to read every page back (what the planning tasks
do together).
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--db", default=None, help="database URL (default: a generated SQLite shop under /tmp)")
    ap.add_argument("--campaign", default="churn_winback")
    ap.add_argument("--group-size", type=int, default=20_000)
    args = ap.parse_args()

    from membercare.campaigns.audience import resolve_audience
    from membercare.campaigns.occurrence import RunOptions, prepare
    from membercare.config import Settings
    from membercare.db import make_engine, upgrade

    as_of = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    url = args.db
    if url is None:
        path = Path(f"/tmp/membercare-audience-bench-{args.members}.db")
        url = f"sqlite:///{path}"
        if not path.exists():
            from membercare.data.generator import generate_shop

            upgrade(url)
            generate_shop(make_engine(url), members=args.members, seed=5, as_of=as_of - timedelta(hours=10))
    upgrade(url)
    engine = make_engine(url)
    settings = Settings(home=Path("/tmp/membercare-audience-bench-home"), secret_key="bench-" + "k" * 32)
    prepared = prepare(settings, args.campaign, RunOptions(as_of=as_of))
    out: dict[str, object] = {"members": args.members, "campaign": args.campaign}
    # Each way twice, alternating; the second figures are kept (the first pays for cold caches).
    for label, snapshot in (("list", False), ("snapshot", True)) * 2:
        tracemalloc.start()
        t0 = time.perf_counter()
        audience = resolve_audience(engine, prepared, snapshot=snapshot)
        wall = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        t0 = time.perf_counter()
        read = sum(len(g.load(engine)) if hasattr(g, "load") else len(g)  # type: ignore[union-attr]
                   for g in audience.groups(args.group_size))
        out[label] = {"entries": len(audience), "resolve_s": round(wall, 3), "heap_peak_mb": round(peak / 2**20, 1),
                      "held_after_mb": round(held / 2**20, 1), "read_groups_s": round(time.perf_counter() - t0, 3),
                      "read": read}
        audience.release(engine)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
