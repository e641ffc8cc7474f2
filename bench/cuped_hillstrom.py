"""CUPED on a real randomised experiment: the Hillstrom e-mail test, pre-period = the customers' past-year spend.

    .venv/bin/python bench/cuped_hillstrom.py [--file tests/fixtures/hillstrom/hillstrom.csv.zip] [--db URL]
                                               [--pre-days 365]

Loads the 64,000 customers into a fresh SQLite database (or ``--db``, an already loaded one), then runs the
ordinary report with ``cuped=True``: the loader places each customer's past-year purchase (``history`` dollars)
``recency`` months before the send, so a 365-day pre-period before the run's ``as_of`` is exactly that history.
Prints, per e-mail campaign and metric, the unadjusted and CUPED lifts with their intervals, the variance
reduction, theta and the covariate's correlation with the outcome, as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from membercare.db import make_engine, upgrade
from membercare.engagement.attribution import AttributionSettings
from membercare.optimise.hillstrom import WINDOW, load_hillstrom_rows, report_range
from membercare.reports import ReportOptions, build_report

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=ROOT / "tests" / "fixtures" / "hillstrom" / "hillstrom.csv.zip")
    ap.add_argument("--db", help="an already loaded database (default: load into a fresh SQLite file)")
    ap.add_argument("--pre-days", type=int, default=365)
    args = ap.parse_args()
    url = args.db
    started = time.perf_counter()
    if url is None:
        url = f"sqlite:///{tempfile.mkdtemp(prefix='cuped_hillstrom_')}/hillstrom.db"
        upgrade(url)
        load_hillstrom_rows(make_engine(url), args.file)
    loaded = time.perf_counter()
    since, until = report_range()
    rep = build_report(make_engine(url), ReportOptions(
        since=since, until=until, timezone="UTC", currency="USD", attribution=AttributionSettings(window=WINDOW),
        cuped=True, cuped_pre_days=args.pre_days))
    out = {"pre_days": args.pre_days, "load_seconds": round(loaded - started, 1),
           "report_seconds": round(time.perf_counter() - loaded, 1), "campaigns": {}}
    for h in rep.holdouts:
        out["campaigns"][h.campaign] = {
            c.metric: {"covariate": c.covariate, "unadjusted": round(c.unadjusted_difference, 5),
                       "unadjusted_ci": [round(v, 5) for v in c.unadjusted_interval],
                       "cuped": round(c.difference, 5), "cuped_ci": [round(v, 5) for v in c.interval],
                       "variance_reduction": round(c.variance_reduction, 4), "theta": round(c.theta, 6),
                       "correlation": None if math.isnan(c.correlation) else round(c.correlation, 4),
                       "covariate_per_row": [round(c.covariate_treated, 4), round(c.covariate_control, 4)]}
            for c in h.cuped}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
