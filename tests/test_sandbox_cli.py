"""``membercare sandbox`` as a process: flags reach the server, the banner tells the port, and it stops
cleanly on SIGTERM and on SIGINT whatever signal dispositions it inherited (``membercare serve`` too)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

CODE = "import sys, membercare.cli as c, membercare.cli.{mod}; c.main(sys.argv[1:])"


def _ignore_sigint() -> None:
    """What a non-interactive shell does to a background job (``cmd &``): SIGINT ignored, inherited by exec."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(mod: str, *args: str, env: dict | None = None, sigint_ignored: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CODE.format(mod=mod), mod, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                            preexec_fn=_ignore_sigint if sigint_ignored else None)


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    """Send ``sig`` to the process group and wait; a process that ignores it is killed and the test fails."""
    try:
        os.killpg(proc.pid, sig)
        try:
            return proc.wait(10), proc.stderr.read()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError(f"{sig.name} did not stop the server within 10 s") from None
    finally:
        proc.stdout.close()
        proc.stderr.close()


def _banner_url(proc: subprocess.Popen, pattern: str) -> str:
    line = proc.stdout.readline()
    match = re.search(pattern, line)
    assert match, (line, proc.poll())
    return match.group(1)


def test_cli_serves_the_provider_apis_with_the_given_flags():
    proc = _start("sandbox", "--port", "0", "--rate-limit", "email=1/min", "--seed", "5")
    try:
        url = _banner_url(proc, r"listening on (http://\S+)")
        mail = {"personalizations": [{"to": [{"email": "a@example.com"}]}], "from": {"email": "s@example.com"},
                "subject": "x", "content": [{"type": "text/plain", "value": "x"}]}
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer SG.x"}) as client:
            assert client.post("/v3/mail/send", json=mail).status_code == 202
            throttled = client.post("/v3/mail/send", json=mail)
            assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
            config = client.get("/sandbox/config").json()
            assert config["seed"] == 5 and abs(config["email"]["rate_limit"] - 1 / 60) < 1e-9
            assert client.get("/sandbox/stats").json()["accepted"] == {"email": 1}
    finally:
        rc, err = _stop(proc, signal.SIGTERM)
    assert rc == 0, err  # its own handler: a clean shutdown, not death by the signal's default action


def test_sandbox_stops_on_sigint_even_when_started_with_sigint_ignored():
    proc = _start("sandbox", "--port", "0", sigint_ignored=True)
    try:
        url = _banner_url(proc, r"listening on (http://\S+)")
        assert httpx.get(url + "/sandbox/stats", timeout=10).status_code == 200
    finally:
        rc, err = _stop(proc, signal.SIGINT)
    assert rc == 0, err


def test_receiver_stops_on_sigint_even_when_started_with_sigint_ignored(tmp_path, sqlite_url):
    """``membercare serve`` runs uvicorn, which installs its own SIGINT and SIGTERM handlers once it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update(MEMBERCARE_DATABASE_URL=sqlite_url, MEMBERCARE_HOME=str(tmp_path / "home"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start("serve", "--port", str(port), env=env, sigint_ignored=True)
    try:
        url = _banner_url(proc, r"receiver on (http://\S+)")
        # The banner comes before uvicorn starts (and installs its handlers): wait until it answers.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(url + "/healthz", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the receiver did not start"
                time.sleep(0.05)
    finally:
        rc, err = _stop(proc, signal.SIGINT)
    assert rc == 0 and "Application shutdown complete" in err, err


def test_write_config_makes_every_command_in_the_folder_send_to_the_sandbox(tmp_path):
    """`membercare sandbox --write-config` in a fresh folder, then `campaign test` there with no membercare
    variable set: it reaches this sandbox (on a port other than the default, so the file follows the port)."""
    from membercare.cli.project import read_project_config

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MEMBERCARE_", "PREFECT_"))}
    env = {**clean, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", CODE.format(mod="sandbox"), "sandbox", "--port", "0",
                             "--write-config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env, cwd=tmp_path)
    try:
        url = _banner_url(proc, r"listening on (http://\S+)")
        path = tmp_path / ".membercare" / "config.toml"
        assert path.is_file() and oct(path.stat().st_mode)[-3:] == "600"
        cfg = read_project_config(path)
        assert cfg["MEMBERCARE_SENDGRID_BASE_URL"] == url and cfg["MEMBERCARE_TWILIO_BASE_URL"] == url
        assert len(cfg["MEMBERCARE_SECRET_KEY"]) >= 32 and cfg["MEMBERCARE_SECRET_KEY"] not in path.read_text()
        r = subprocess.run([sys.executable, "-c", CODE.format(mod="campaign"), "campaign", "test",
                            "vip_appreciation", "--to", "qa@example.com"], capture_output=True, text=True,
                           env={**env, "COLUMNS": "200"}, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "2 of 2 test messages accepted" in r.stdout
        records = httpx.get(url + "/sandbox/messages", timeout=10).json()
        assert len(records["messages"] if isinstance(records, dict) else records) == 2
    finally:
        _stop(proc, signal.SIGTERM)
