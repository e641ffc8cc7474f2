"""The Prefect UI shows our runs, their logs and artifacts: a real server, a real flow run, headless Chromium.

The server is started the way ``membercare ui`` starts it (the command itself, on a temporary PREFECT_HOME and a
free loopback port, so ``PREFECT_UI_API_URL`` is what that command sets); a dry run of ``coupon_expiry`` on a
small generated shop runs against it through the CLI with the demo's Prefect logging settings; Chromium then
loads the run's page, the runs list and the artifacts list as a person would, and takes a screenshot.
``MEMBERCARE_KEEP_SCREENSHOT=path`` keeps the screenshot.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_gallery import _png_stats

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys, membercare.cli as c; c.main(sys.argv[1:])"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
CAMPAIGN = "coupon_expiry"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMBERCARE_", "PREFECT_"))}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="200", **extra)
    return env


def _healthy(api: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn is a child of ``prefect server start``), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """``membercare ui`` on a free port; yields its base URL. Stops the server's process group even on failure."""
    tmp = tmp_path_factory.mktemp("prefect-ui")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    env = _clean_env(PREFECT_HOME=str(tmp / "prefect"), MEMBERCARE_HOME=str(tmp / "home"))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", ENTRY, "ui", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(f"{base}/api"):
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"Prefect server not healthy (exit {proc.poll()}): {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        _stop_group(proc)


@pytest.fixture(scope="module")
def flow_run(prefect_ui, tmp_path_factory) -> dict:
    """A dry run of one campaign through the CLI against that server; the flow run as the API returns it."""
    import httpx

    from membercare.cli.demo import prefect_env
    from membercare.data.generator import default_as_of, generate_shop
    from membercare.db import make_engine, upgrade

    tmp = tmp_path_factory.mktemp("ui-shop")
    url = f"sqlite:///{tmp / 'membercare.db'}"
    upgrade(url)
    engine = make_engine(url)
    as_of = default_as_of()
    generate_shop(engine, members=200, seed=5, as_of=as_of)
    engine.dispose()
    api = f"{prefect_ui}/api"
    # The demo's Prefect settings (INFO to the API, a quiet terminal), pointed at this server.
    env = _clean_env(**{**prefect_env(tmp), "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "prefect"),
                        "MEMBERCARE_HOME": str(tmp / "home"), "MEMBERCARE_DATABASE_URL": url})
    res = subprocess.run([sys.executable, "-c", ENTRY, "campaign", "run", CAMPAIGN, "--dry-run", "--limit", "20",
                          "-p", "days=14", "--as-of", as_of.isoformat(), "--no-samples"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    run, = (r for r in runs if r["name"].startswith(f"{CAMPAIGN}-dry-run"))
    # The API log handler ships in batches; wait (bounded) until the flow's own INFO line has arrived.
    deadline = time.monotonic() + 30
    body = {"logs": {"flow_run_id": {"any_": [run["id"]]}}}
    while not any("dry run " in x["message"] for x in httpx.post(f"{api}/logs/filter", json=body, timeout=10).json()):
        assert time.monotonic() < deadline, "the flow run's logs never reached the API"
        time.sleep(0.5)
    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
                           timeout=10).json()
    return {**run, "artifacts": {a["key"]: a["id"] for a in artifacts}, "cli_stderr": res.stderr}


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([
        str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--window-size=1280,900", *args,
    ], capture_output=True, text=True, timeout=120)


def _page_text(tmp_path: Path, url: str) -> str:
    """The visible text of the page at ``url`` after the single-page app has rendered it."""
    dom = _chromium(tmp_path, "--dump-dom", url).stdout
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def test_demo_logs_runs_at_info_to_the_api_and_keeps_the_console_quiet(tmp_path):
    """The demo's Prefect settings, as Prefect's own logging set-up reads them (issue 19: no logs in the UI)."""
    from membercare.cli.demo import prefect_env

    code = ("import logging; from prefect.logging.configuration import setup_logging; setup_logging(); "
            "r = logging.getLogger('prefect.flow_runs'); "
            "print(r.getEffectiveLevel(), *[type(h).__name__ + ':' + str(h.level) for h in r.handlers], "
            "*[type(h).__name__ + ':' + str(h.level) for h in logging.getLogger().handlers])")
    env = _clean_env(**prefect_env(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    level, api_handler, console = res.stdout.split()
    assert int(level) == 20 and api_handler == "APILogHandler:0"  # INFO records reach the API
    assert console == "PrefectConsoleHandler:30"  # the terminal shows warnings and errors only


@pytest.mark.slow  # a Prefect server (6-23 s to start), one flow run through the CLI and a headless browser
@pytest.mark.skipif(CHROMIUM is None,
                    reason="headless Chromium is not installed (looked for chromium, /usr/bin/chromium): "
                           "the Prefect UI is not checked")
def test_prefect_ui_shows_the_run_its_logs_and_artifacts(prefect_ui, flow_run, tmp_path):
    name, run_id = flow_run["name"], flow_run["id"]
    assert "| INFO" not in flow_run["cli_stderr"]  # the demo's settings keep INFO off the terminal...
    run_page = _page_text(tmp_path, f"{prefect_ui}/runs/flow-run/{run_id}")
    assert name in run_page and "Completed" in run_page
    # ...and send it to the run's Logs tab (the default tab): our own lines, not only Prefect's.
    assert re.search(rf"{CAMPAIGN}/once: segment coupon_expiring\(days=14\) has 20 members", run_page), run_page
    assert f"dry run {CAMPAIGN}/once: segment 20, planned 20" in run_page
    assert "didn't generate logs" not in run_page
    runs_page = _page_text(tmp_path, f"{prefect_ui}/runs")
    assert name in runs_page and "run-campaign" in runs_page
    artifacts_page = _page_text(tmp_path, f"{prefect_ui}/artifacts")
    assert "coupon-expiry-dry-run" in artifacts_page and "coupon-expiry-report" in artifacts_page
    assert set(flow_run["artifacts"]) == {"coupon-expiry-dry-run", "coupon-expiry-report"}
    # Each artifact's page shows its content and links back to the flow run. (The run page's Artifacts tab
    # is not reachable by URL: Prefect's UI ignores ?tab= on load.)
    table = _page_text(tmp_path, f"{prefect_ui}/artifacts/artifact/{flow_run['artifacts']['coupon-expiry-dry-run']}")
    # (How many would go now rather than after quiet hours depends on the hour; the segment does not.)
    assert name in table and re.search(r"segment size 20 .*sent via email \d+ sent via sms \d+", table), table
    report = _page_text(tmp_path, f"{prefect_ui}/artifacts/artifact/{flow_run['artifacts']['coupon-expiry-report']}")
    assert name in report and f"{CAMPAIGN} · once · dry run" in report and re.search(r"would send \d+", report), report

    shot = tmp_path / "run.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", f"{prefect_ui}/runs/flow-run/{run_id}")
    assert shot.is_file(), res.stderr[-2000:]
    width, height, distinct_rows = _png_stats(shot)
    assert (width, height) == (1280, 900)
    # A rendered page (run graph, tabs, log lines), not a blank or error screen: a blank one has a handful of
    # distinct rows and compresses to a few KB; this one measured ~100 KB.
    assert distinct_rows > 50 and shot.stat().st_size > 30_000, (distinct_rows, shot.stat().st_size)
    keep = os.environ.get("MEMBERCARE_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
