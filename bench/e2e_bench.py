"""The end-to-end benchmark as a script: the same code as ``membercare bench`` (bench/e2e/).

    .venv/bin/python bench/e2e_bench.py [--members 10000,100000,1000000] [--baseline 1000,10000] [--out DIR]
        [--seed 42] [--cache /tmp/membercare-bench-cache] [--db sqlite|postgres] [--postgres-url URL] [--keep]

Writes results.json, results.md, scaling.svg and scaling.png (default bench/results/e2e-<timestamp>/).
What is measured and how to read it: docs/benchmark.md. Results of separate invocations (say 10k and 100k
in one, 1M in another) are combined into one report, chart and verdicts with

    .venv/bin/python bench/e2e_bench.py merge OUT_DIR RESULTS_DIR_OR_JSON [...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["merge"]:
        if len(args) < 3:
            raise SystemExit("usage: e2e_bench.py merge OUT_DIR RESULTS_DIR_OR_JSON [...]")
        from bench.e2e.report import merge_files

        paths = merge_files(Path(args[1]), [Path(a) for a in args[2:]])
        print("\n".join(str(p) for p in paths.values()))
        return
    import membercare.cli.bench  # noqa: F401 - registers the command whether or not the CLI lists it yet
    from membercare.cli import main as cli_main

    cli_main(["bench", *args])


if __name__ == "__main__":
    main()
