"""The raw request rate this machine reaches against the provider sandbox: the ceiling for dispatch.

Starts ``membercare sandbox`` in its own process (its own core, as in real runs), then drives each provider
endpoint with a minimal keep-alive HTTP client (aiohttp on uvloop, N concurrent requests in flight) at zero
latency and no faults, and prints requests/s per endpoint. The delivery engine's dispatch benchmark is
compared with these figures (issue 5: at least half of this ceiling at zero latency).

    .venv/bin/python bench/sandbox_ceiling.py [--seconds 5] [--concurrency 64] [--latency-ms 0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

SANDBOX = "import sys, membercare.cli as c, membercare.cli.sandbox; c.main(sys.argv[1:])"


# The same, under cProfile: the profile is written to the path in argv[1] when the sandbox stops (SIGINT).
SANDBOX_PROFILED = ("import cProfile, sys, membercare.cli as c, membercare.cli.sandbox\n"
                    "out = sys.argv.pop(1)\nprof = cProfile.Profile()\nprof.enable()\n"
                    "try:\n    c.main(sys.argv[1:])\nfinally:\n    prof.disable()\n    prof.dump_stats(out)\n")


def start_sandbox(latency_ms: float, *, profile: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``membercare sandbox`` on a free port in its own session; ``profile``: cProfile output path."""
    code = [SANDBOX] if profile is None else [SANDBOX_PROFILED, profile]
    args = [sys.executable, "-c", *code, "sandbox", "--port", "0", "--latency-ms", str(latency_ms)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"sandbox did not start: {line!r}")
    return proc, match.group(1)


def fake_assertion(token_url: str) -> str:
    """An RS256-shaped JWT: the sandbox checks claims, and signatures only for registered service accounts."""
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    now = int(time.time())
    claims = {"iss": "bench@example.iam.gserviceaccount.com", "aud": token_url, "iat": now, "exp": now + 3600,
              "scope": "https://www.googleapis.com/auth/firebase.messaging"}
    return f"{enc({'alg': 'RS256', 'typ': 'JWT'})}.{enc(claims)}.c2ln"


async def drive(session, method_url: str, make_request, seconds: float, concurrency: int) -> tuple[int, int, float]:
    ok = errors = 0
    deadline = time.perf_counter() + seconds
    counter = 0

    async def worker():
        nonlocal ok, errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            kwargs = make_request(counter)
            async with session.post(method_url, **kwargs) as resp:
                await resp.read()
                if resp.status < 300:
                    ok += 1
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors, time.perf_counter() - start


async def main_async(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    results: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        # No STOP replies or uninstalls: every request of the run must be accepted.
        quiet = {ch: {"unsubscribed": 0.0} for ch in ("email", "sms", "push")}
        async with session.post(url + "/sandbox/config", json={"engagement": quiet}) as resp:
            assert resp.status == 200, await resp.text()
        async with session.post(url + "/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                                      "assertion": fake_assertion(url + "/token")}) as resp:
            access = (await resp.json())["access_token"]
        sid = "AC" + "0" * 32
        basic = "Basic " + base64.b64encode(f"{sid}:token".encode()).decode()
        endpoints = {
            "sendgrid": (url + "/v3/mail/send", lambda i: {
                "headers": {"Authorization": "Bearer SG.bench"},
                "json": {"personalizations": [{"to": [{"email": f"m{i}@example.com"}],
                                               "custom_args": {"membercare_message_id": f"m-{i}"}}],
                         "from": {"email": "shop@example.com"}, "subject": "Hi",
                         "content": [{"type": "text/plain", "value": "Hi"}]}}),
            "twilio": (url + f"/2010-04-01/Accounts/{sid}/Messages.json", lambda i: {
                "headers": {"Authorization": basic},
                "data": {"To": f"+88691{i % 10_000_000:07d}", "From": "+886223456789", "Body": "Hi"}}),
            "fcm": (url + "/v1/projects/bench/messages:send", lambda i: {
                "headers": {"Authorization": f"Bearer {access}"},
                "json": {"message": {"token": f"device-token-{i:08d}", "notification": {"title": "t", "body": "b"},
                                     "data": {"membercare_message_id": f"m-{i}"}}}}),
        }
        for name, (endpoint, make) in endpoints.items():
            await drive(session, endpoint, make, 0.5, concurrency)  # warm-up
            ok, errors, elapsed = await drive(session, endpoint, make, seconds, concurrency)
            results[name] = ok / elapsed
            if errors:
                results[name + "_errors"] = errors
                async with session.get(url + "/sandbox/stats") as resp:
                    results[name + "_rejected"] = (await resp.json())["rejected"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    proc, url = start_sandbox(args.latency_ms)
    try:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            results = runner.run(main_async(url, args.seconds, args.concurrency))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
    results.update(concurrency=args.concurrency, latency_ms=args.latency_ms, cpus=os.cpu_count())
    if args.json:
        print(json.dumps(results))
        return
    print(f"sandbox ceiling, {args.concurrency} concurrent keep-alive requests, {args.latency_ms:g} ms latency, "
          f"{os.cpu_count()} CPUs")
    for name in ("sendgrid", "twilio", "fcm"):
        print(f"  {name:9s} {results[name]:9,.0f} requests/s"
              + (f"  ({results[name + '_errors']} errors)" if name + "_errors" in results else ""))


if __name__ == "__main__":
    main()
