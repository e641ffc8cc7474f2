"""``membercare sandbox`` as a process: flags reach the server, the banner tells the port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx

CODE = "import sys, membercare.cli as c, membercare.cli.sandbox; c.main(sys.argv[1:])"


def test_cli_serves_the_provider_apis_with_the_given_flags():
    proc = subprocess.Popen([sys.executable, "-c", CODE, "sandbox", "--port", "0", "--rate-limit", "email=1/min",
                             "--seed", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"listening on (http://\S+)", line).group(1)
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
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
