"""Smoke test of the chaos benchmark (``bench/chaos.py``): at a tiny size it runs to the end on PostgreSQL and
reports every figure, in the table and in the JSON file.

Only completion and the presence of the figures are asserted. Their values (duplicates, never-attempted
rows left unsent, sends after an acknowledged STOP, dispatcher exits after a dropped connection) are what
the benchmark measures, not what this test checks: docs/delivery.md, "Chaos benchmark".
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "chaos.py"


def _figures() -> tuple[tuple[str, str], ...]:
    spec = importlib.util.spec_from_file_location("chaos_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module.FIGURES


@pytest.mark.slow
@pytest.mark.postgres
def test_chaos_benchmark_completes_at_a_tiny_size_and_reports_every_figure(tmp_path):
    server = os.environ.get("MEMBERCARE_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("PostgreSQL not configured: set MEMBERCARE_TEST_POSTGRES_URL")
    out = tmp_path / "chaos.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--members", "300", "--kills", "1", "--planner-kills", "1",
         "--terminations", "2", "--stops", "3", "--dispatchers", "2", "--timeout", "300",
         "--database-url", server, "--json", str(out)],
        capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = _figures()
    for _, label in figures:
        assert label in done.stdout, f"{label!r} missing from the table"
    result = json.loads(out.read_text())
    assert result["options"]["members"] == 300
    (run,) = result["runs"]
    missing = [key for key, _ in figures if key not in run]
    assert not missing, missing
    assert run["members"] == 300 and run["plan_rows"] == 300 and 0 < run["planned"] <= 300
    assert run["planner_kills"] <= 1 and run["kills"] <= 1 and run["stops_acknowledged"] <= 3
    assert run["wall_s"] > 0
