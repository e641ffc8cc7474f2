"""``membercare bench``: the end-to-end path on a tiny shop, and the report, chart and verdict builders."""

from __future__ import annotations

import json
import os

import pytest

from bench.e2e import report
from bench.e2e.harness import STAGES, BenchOptions, parse_sizes, union_seconds
from membercare.errors import ConfigurationError, InputError

PG_ENV = "MEMBERCARE_TEST_POSTGRES_URL"


# --------------------------------------------------------------------------------------------- end to end


def _run_cli(args: list[str]) -> None:
    """The command through the CLI entry point, in this process (the session's Prefect harness runs the flows)."""
    import membercare.cli.bench  # noqa: F401 - registers the command (until the CLI lists it)
    from membercare.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", *args])
    assert done.value.code == 0


@pytest.mark.slow  # a whole benchmark run (shop, flows, sandbox, receiver): about a minute
def test_bench_runs_end_to_end_on_sqlite(tmp_path, prefect_harness):
    out = tmp_path / "out"
    _run_cli(["--members", "300", "--baseline", "50", "--out", str(out), "--cache", str(tmp_path / "cache"),
              "--drain-timeout", "120"])

    results = json.loads((out / "results.json").read_text())
    (size,) = results["sizes"]
    assert size["members"] == 300 and size["audience"] == 300
    for name in STAGES:
        stage = size["stages"][name]
        assert stage["seconds"] > 0, name
        assert stage["messages"] > 0, name
        assert stage["task_runs"] >= 1, name
    # The real flow ran as a handful of batch tasks, not one per message.
    assert 5 <= size["campaign_flow"]["task_runs"] < 20
    assert 0 <= size["campaign_flow"]["prefect_share"] < 1
    # Every planned member has a ledger row; every message the ledger calls sent reached the sandbox once.
    assert size["planned"] == 300
    assert size["holdout"] > 0 and size["sent"] + size["holdout"] <= 300
    verify = size["verify"]
    assert verify["ids_checked"] and verify["exactly_once"], verify
    assert verify["ledger_sent"] == verify["sandbox_accepted"] == size["sent"] > 200
    assert verify["missing_at_sandbox"] == verify["received_more_than_once"] == 0
    assert size["stages"]["webhooks"]["drained"]
    assert size["peak_rss_mb"]["harness"] > 0 and size["peak_rss_mb"]["sandbox"] > 0
    # CPU per stage and process: planning ran in the flow process (serial at this size), the providers' side
    # in the sandbox, the webhooks in the receiver; per unit figures are derived from them.
    cpu = {name: size["stages"][name]["cpu_s"] for name in STAGES}
    assert cpu["plan_render"]["flow"] > 0 and cpu["dispatch"]["sandbox"] > 0
    assert cpu["dispatch"]["receiver"] + cpu["webhooks"]["receiver"] > 0
    assert size["stages"]["dispatch"]["ours_cpu_ms_per_unit"] > 0 and size["campaign_flow"]["cpu_ms_per_message"] > 0
    # The ceilings and the segment reference were measured in the same run, on the same data.
    assert size["planning_ceiling"]["messages"] == size["sent"]
    assert 0 < size["planning_ceiling"]["cpu_ms_per_message"] < size["stages"]["plan_render"]["ours_cpu_ms_per_unit"]
    assert 0 < size["dispatch_ceiling"]["raw_cpu_ms_per_message"], size["dispatch_ceiling"]
    assert size["segments"]["all_counts_agree"], size["segments"]
    assert {s["step"] for s in size["segments"]["steps"]} >= {"rfm compute", "churn_risk"}
    # A second shop size is never generated for nothing: the cache holds the 300- and 50-member shops.
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.sqlite")) == [
        "shop-300-seed42-20261123.sqlite", "shop-50-seed42-20261123.sqlite"]

    (base,) = results["baseline"]
    assert base["messages"] == 50 and base["error"] is None, base
    # Members without a consented, reachable channel are skipped by the baseline too (no send, no failure).
    # The holdout is skipped as in a campaign run (same campaign, same rule).
    assert base["sent"] + base["skipped"] == 50 and base["sent"] > 30 and base["failed"] == 0
    assert base["task_runs"] >= 50
    assert base["sandbox_accepted"] == base["sent"] and base["sandbox_duplicates"] == 0
    (ratio,) = results["ratios"]
    assert ratio["ratio"] > 0 and ratio["cpu_ratio"] > 0
    assert ratio["baseline_cpu_ms_per_message"] > ratio["ours_cpu_ms_per_message"]

    md = (out / "results.md").read_text()
    assert "| segment |" in md and "| plan and render |" in md and "| dispatch |" in md
    assert "| webhook ingestion |" in md and "one task per message" in md
    assert "CPU ms per unit" in md and "Planning ceiling" in md and "Dispatch ceiling" in md and "by CPU" in md
    assert "![time and peak memory against members](scaling.svg)" in md
    assert (out / "scaling.svg").read_text().lstrip().startswith("<svg")
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.postgres
def test_bench_runs_on_postgres(tmp_path, prefect_harness):
    server = os.environ.get(PG_ENV)
    if not server:
        pytest.skip(f"{PG_ENV} is not set")
    out = tmp_path / "out"
    _run_cli(["--members", "200", "--baseline", "0", "--db", "postgres", "--postgres-url", server,
              "--out", str(out), "--drain-timeout", "120", "--dispatchers", "2"])
    results = json.loads((out / "results.json").read_text())
    # Two dispatcher processes per pass (the flow's own option), recorded with the command that reproduces it.
    assert results["options"]["dispatchers"] == 2 and "--dispatchers 2" in results["command"]
    (size,) = results["sizes"]
    assert size["db"] == "postgres" and size["planned"] == 200
    assert size["verify"]["exactly_once"] and size["sent"] > 100
    assert all(size["stages"][s]["seconds"] > 0 for s in STAGES)


def test_bad_options_are_rejected_with_the_reason(tmp_path):
    with pytest.raises(InputError, match="'ten' is not a number"):
        parse_sizes("10k,ten", "--members")
    with pytest.raises(InputError, match="positive"):
        BenchOptions(members=[0]).validate()
    with pytest.raises(InputError, match="sqlite or postgres"):
        BenchOptions(db="mysql").validate()
    with pytest.raises(ConfigurationError, match="--postgres-url"):
        BenchOptions(db="postgres").validate()
    with pytest.raises(InputError, match="--dispatchers"):
        BenchOptions(dispatchers=0).validate()
    assert parse_sizes("10k, 100000,1M", "--members") == [10_000, 100_000, 1_000_000]
    assert parse_sizes("0", "--baseline") == [0]


# ------------------------------------------------------------------------------------------- unit tests


def test_union_seconds_counts_overlapping_calls_once():
    assert union_seconds([(0, 2), (1, 3), (5, 6)], 0, 10) == pytest.approx(4)
    assert union_seconds([(0, 2), (1, 3), (5, 6)], 1.5, 5.5) == pytest.approx(2)
    assert union_seconds([], 0, 1) == 0


def test_scaling_verdict_linear_time_and_flat_memory():
    v = report.scaling_verdict([(10_000, 9.0, 300.0), (100_000, 80.0, 320.0), (1_000_000, 790.0, 340.0)])
    assert v["status"] == "met" and v["time_linear"] and v["memory_flat"]
    assert 0.9 < v["time_slope"] < 1.0
    assert v["fit_s_per_member"] == pytest.approx(7.9e-4, rel=0.02)
    assert "grows linearly" in v["line"] and "stays flat" in v["line"]


def test_scaling_verdict_catches_superlinear_time_and_growing_memory():
    quad = report.scaling_verdict([(10_000, 1.0, 300.0), (100_000, 100.0, 900.0), (1_000_000, 10_000.0, 4000.0)])
    assert quad["status"] == "missed" and not quad["time_linear"] and not quad["memory_flat"]
    assert "faster than linearly" in quad["line"] and "grows (" in quad["line"]
    assert report.scaling_verdict([(10_000, 5.0, 300.0)])["status"] == "not measured"
    assert report.scaling_verdict([(10_000, 5.0, 300.0), (20_000, 9.0, 300.0)])["status"] == "not measured"


def _size(members: int, plan: float, dispatch: float, rss: float, rate: float) -> dict:
    stages = {s: {"seconds": 1.0, "messages": members, "messages_per_s": members, "peak_rss_mb": rss,
                  "children_peak_rss_mb": 0.0, "task_runs": 1, "domain_seconds": 0.9, "prefect_share": 0.1}
              for s in STAGES}
    stages["plan_render"]["seconds"] = plan
    stages["dispatch"]["seconds"] = dispatch
    stages["webhooks"].update(tail_seconds=0.5, sync_seconds=0.5, window_seconds=2.0, drained=True)
    return {"members": members, "db": "sqlite", "audience": members, "planned": members, "sent": int(members * 0.9),
            "holdout": members // 10, "holdout_share": 0.1, "shop": {"cached": True, "generation_s": 3.0},
            "ledger": {"sent_by_channel": {"email": members // 2}, "events_total": members},
            "stages": stages, "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0],
            "campaign_flow": {"seconds": plan + dispatch + 2, "messages": members, "messages_per_s": rate,
                              "task_runs": 9, "prefect_share": 0.05, "peak_rss_mb": rss, "children_peak_rss_mb": 0.0},
            "peak_rss_mb": {"harness": rss, "workers": 0.0, "sandbox": 200.0, "receiver": 150.0},
            "verify": {"exactly_once": True, "ledger_sent": members, "sandbox_accepted": members, "duplicates": 0}}


def _results() -> dict:
    return {"command": "membercare bench", "machine": {"cpus": 2, "packages": {}}, "options": {"db": "sqlite"},
            "sizes": [_size(10_000, 5.0, 8.0, 300.0, 800.0), _size(100_000, 40.0, 80.0, 330.0, 900.0),
                      _size(1_000_000, 100.0, 700.0, 1100.0, 1000.0)],
            "baseline": [{"messages": 1_000, "messages_per_s": 50.0, "sent": 1000},
                         {"messages": 10_000, "messages_per_s": 40.0, "sent": 10000},
                         {"messages": 50_000, "error": "timed out after 600 s"},
                         {"messages": 20_000, "messages_per_s": 32.0, "sent": 19000,
                          "error": "Prefect recorded 15000 of 20001 task runs"},
                         {"messages": 30_000, "messages_per_s": 9.0, "error": "measurement failed: OSError: x"}]}


def test_targets_and_ratios_give_one_verdict_each_with_the_figure():
    results = _results()
    results["ratios"] = report.ratios(results)
    assert [r.get("ratio") for r in results["ratios"]] == [16.0, 20.0, None, 25.0, None]  # 800/50, 800/40, 800/32
    assert "timed out" in results["ratios"][2]["error"]
    # A plain flow that ran but lost task-run records still has a throughput: the ratio carries the note.
    assert "error" not in results["ratios"][3] and "15000 of 20001" in results["ratios"][3]["note"]
    assert "measurement failed" in results["ratios"][4]["error"]
    by_name = {t["name"]: t for t in report.targets(results)}
    # plan+render at 1M = segment 1 s + plan 100 s -> met; dispatch 700 s -> missed; 1,100 MB -> missed.
    assert by_name["plan_render_1m"]["status"] == "met" and by_name["plan_render_1m"]["figure"] == 101.0
    assert by_name["dispatch_1m"]["status"] == "missed" and "700.0 s" in by_name["dispatch_1m"]["line"]
    assert by_name["memory_1m"]["status"] == "missed"
    assert by_name["ratio_10k"]["status"] == "met" and by_name["ratio_10k"]["figure"] == 20.0
    small = {"sizes": [_size(10_000, 5.0, 8.0, 300.0, 800.0)], "baseline": []}
    assert {t["status"] for t in report.targets(small)} == {"not measured"}


def test_issue18_verdicts_use_cpu_per_unit_the_same_runs_ceilings_and_the_10k_ratios():
    results = _results()
    top = results["sizes"][2]
    top["stages"]["plan_render"]["ours_cpu_ms_per_unit"] = 0.30
    top["stages"]["dispatch"]["ours_cpu_ms_per_unit"] = 0.28
    top["planning_ceiling"] = {"cpu_ms_per_message": 0.10, "messages": 5000}
    top["dispatch_ceiling"] = {"raw_cpu_ms_per_message": 0.14}
    top["segments"] = {"steps": [{"step": "rfm compute", "ratio": 2.0}, {"step": "churn_risk", "ratio": 3.4}],
                       "worst": {"step": "churn_risk", "ratio": 3.4}}
    top["peak_rss_mb"]["harness"] = 280.0
    ten = results["sizes"][0]
    ten["campaign_flow"]["cpu_ms_per_message"] = 1.0
    results["baseline"][1].update(cpu_seconds=300.0, server_cpu_seconds=100.0)  # 40 ms per sent message
    by_name = {t["name"]: t for t in report.targets(results)}
    assert by_name["plan_cpu"]["status"] == "missed" and "0.300 ms at 1,000,000 members" in by_name["plan_cpu"]["line"]
    assert by_name["plan_ceiling"]["status"] == "missed" and by_name["plan_ceiling"]["figure"] == 3.0
    assert by_name["dispatch_cpu"]["status"] == "met" and by_name["dispatch_ceiling"]["figure"] == 2.0
    assert by_name["campaign_1m"]["status"] == "missed"  # 100 + 700 + 2 s > 480 s
    assert by_name["flow_memory_1m"]["status"] == "met"
    assert by_name["cpu_ratio_10k"]["figure"] == 40.0 and by_name["cpu_ratio_10k"]["status"] == "met"
    assert by_name["wall_ratio_10k"]["figure"] == 20.0 and by_name["wall_ratio_10k"]["status"] == "met"
    seg = by_name["segments_duckdb"]
    assert seg["status"] == "missed" and "worst: churn_risk" in seg["line"]


def test_cpu_snapshot_splits_this_process_its_workers_and_the_services():
    import subprocess
    import sys

    from bench.e2e.harness import cpu_snapshot

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    service = subprocess.Popen([sys.executable, "-c", burn])
    worker = subprocess.Popen([sys.executable, "-c", burn])
    try:
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            snap = cpu_snapshot({"sandbox": service.pid})
            if snap["sandbox"] >= 0.3 and snap["workers"] >= 0.3:
                break
            time.sleep(0.1)
        assert snap["sandbox"] >= 0.3  # the service's own CPU, not counted as a worker's
        assert snap["workers"] >= 0.3  # the live child that is not a service
        assert snap["flow"] > 0
    finally:
        for proc in (service, worker):
            proc.kill()
            proc.wait()


def test_report_writes_markdown_tables_and_the_chart(tmp_path):
    results = _results()
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    results["scaling"] = report.scaling_verdict([(s["members"], s["campaign_flow"]["seconds"],
                                                  s["peak_rss_mb"]["harness"]) for s in results["sizes"]])
    (tmp_path / "results.json").write_text(json.dumps(results))
    paths = report.rebuild(tmp_path / "results.json")
    md = paths["md"].read_text()
    assert "| 1,000,000 |" in md and "MISSED (700.0 s at 1M members)" in md
    assert "**20.0x**" in md and "timed out after 600 s" in md
    svg = paths["svg"].read_text()
    assert svg.lstrip().startswith("<svg") and "Peak memory vs members" in svg and "Time per stage" in svg
    assert paths["png"].stat().st_size > 1000
    spec = report.scaling_chart(results).to_dict()
    fit = [d for d in json.dumps(spec).split('"series": ') if d.startswith('"linear fit')]
    assert fit, "the chart carries the linear-fit reference line"


def test_merge_combines_runs_and_recomputes_the_verdicts(tmp_path):
    full = _results()
    first = {**full, "command": "membercare bench --members 10000,100000", "sizes": full["sizes"][:2],
             "started_at": "2026-11-23T12:00:00+00:00", "finished_at": "2026-11-23T12:30:00+00:00"}
    second = {**full, "command": "membercare bench --members 1000000 --baseline 0", "sizes": full["sizes"][2:],
              "baseline": [], "started_at": "2026-11-23T13:00:00+00:00", "finished_at": "2026-11-23T13:40:00+00:00"}
    for name, part in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    paths = report.merge_files(tmp_path / "merged", [tmp_path / "a", tmp_path / "b" / "results.json"])
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [s["members"] for s in merged["sizes"]] == [10_000, 100_000, 1_000_000]
    assert merged["command"].count("membercare bench") == 2 and len(merged["parts"]) == 2
    assert merged["finished_at"].startswith("2026-11-23T13:40")
    assert {t["name"]: t["status"] for t in merged["targets"]}["dispatch_1m"] == "missed"
    assert merged["scaling"]["status"] in ("met", "missed") and paths["svg"].is_file()
