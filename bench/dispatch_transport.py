"""CPU per message of the dispatcher's provider calls: blocking transports on threads versus the async transport.

The sandbox runs in its own process (``membercare sandbox``, no latency, no faults); this process is the
dispatcher. For each channel it sends ``N`` messages through the real adapters (sendgrid, twilio,
firebase-admin) in each mode, always ``--workers`` requests in flight:

* ``threads``: the dispatcher's send pool, each worker thread making the adapter's blocking ``send``
  (SDK-built request on a urllib3 keep-alive pool), as with ``DispatchConfig(transport="threads")``;
* ``async``: the same send pool with ``asynchronous=True``: worker threads hand each exchange to the send
  loop, which runs the adapter's ``send_async`` (SDK-built request, aiohttp), as with the default
  ``DispatchConfig(transport="async")``;
* ``loop``: ``send_async`` gathered straight on the send loop, no worker threads (what a dispatcher
  without threads would pay for the transport);
* ``raw``: the ceiling: a minimal aiohttp client posting a prebuilt request of the same shape, on the
  same loop with the same number in flight.

The send gate and the database are left out (the dispatcher's bookkeeping is the same in every mode):
the figures are the transport's. Reported per mode: CPU ms per message of this process (all its threads)
and of the sandbox process, and messages/s (wall; the machine may be shared, prefer the CPU figures).

    .venv/bin/python bench/dispatch_transport.py [--messages 3000] [--workers 32] [--repeat 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CHANNELS = ("email", "sms", "push")
MODES = ("threads", "async", "async8", "loop", "raw")
HTML = ("<html><body><h1>{name}，本週會員限定</h1>" + "<p>親愛的會員，感謝您一直以來的支持。這是您專屬的優惠內容，"
        "點此查看 <a href='https://shop.example/s/{i}'>更多</a>。</p>" * 12 + "</body></html>")


def messages(channel: str, n: int, offset: int):
    from membercare.delivery.contract import EmailContent, OutboundMessage, PushContent, SmsContent
    from membercare.models import Channel, Purpose

    out = []
    for i in range(offset, offset + n):
        if channel == "email":
            to, content = f"member{i}@example.com", EmailContent(
                subject="本週會員限定：全館 8 折", html=HTML.format(name="美玲", i=i), text="本週會員限定：全館 8 折",
                preheader="只到週日", headers={"List-Unsubscribe": f"<https://shop.example/u/{i}>",
                                           "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
        elif channel == "sms":
            to, content = f"+8869{i % 100_000_000:08d}", SmsContent(
                body=f"[Shop] 美玲，本週會員限定全館 8 折 https://s.example/{i} 回覆 STOP 取消", encoding="UCS-2",
                segments=1)
        else:
            to, content = f"device-token-{i:010d}", PushContent(
                title="本週會員限定", body="全館 8 折，只到週日", data={"deeplink": f"shop://sale/{i}"})
        out.append(OutboundMessage(message_id=f"{i:032x}", idempotency_key=f"bench|occ|{i}", channel=Channel(channel),
                                   purpose=Purpose.MARKETING, to=to, content=content, campaign="bench",
                                   categories=("bench",)))
    return out


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pool(adapter, msgs, workers: int, asynchronous: bool, threads: int | None = None) -> None:
    from membercare.delivery.dispatch_pool import SendPool
    from membercare.delivery.dispatch_types import Job

    completed: queue.SimpleQueue = queue.SimpleQueue()
    pool: SendPool

    def send(job):
        return pool.handoff(job, adapter)

    pool = SendPool(workers, send, completed, asynchronous=asynchronous, threads=threads)
    jobs = [Job(row={"id": i}, ctx=None, channel=m.channel.value, chain_rest=(), contents={}, message=m)
            for i, m in enumerate(msgs)]
    for job in jobs:
        pool.submit(job)
    for _ in jobs:
        job = completed.get(timeout=120)
        if job.error is not None:
            raise job.error
    pool.shutdown()
    _check(j.result for j in jobs)


def run_loop(adapter, msgs, workers: int) -> None:
    from membercare.delivery.send_loop import send_loop

    async def go():
        sem = asyncio.Semaphore(workers)

        async def one(m):
            async with sem:
                return await adapter.send_async(m)

        return await asyncio.gather(*(one(m) for m in msgs))

    _check(asyncio.run_coroutine_threadsafe(go(), send_loop()).result(timeout=300))


def _check(results) -> None:
    from membercare.delivery.contract import Accepted

    bad = [r for r in results if not isinstance(r, Accepted)]
    if bad:
        raise SystemExit(f"{len(bad)} not accepted, e.g. {bad[0]}")


def run_raw(url: str, channel: str, msgs, workers: int, access: str) -> None:
    """The ceiling: prebuilt-shaped requests posted by a minimal aiohttp client (no SDK, no adapter)."""
    import base64

    import aiohttp

    from membercare.delivery.send_loop import send_loop

    sid = "AC" + "0" * 32
    basic = "Basic " + base64.b64encode(f"{sid}:bench-token".encode()).decode()

    def request(m):
        c = m.content
        if channel == "email":
            return url + "/v3/mail/send", {"headers": {"Authorization": "Bearer SG.bench"}, "json": {
                "personalizations": [{"to": [{"email": m.to}], "custom_args": {"membercare_message_id": m.message_id}}],
                "from": {"email": "shop@example.com"}, "subject": c.subject,
                "content": [{"type": "text/plain", "value": c.text}, {"type": "text/html", "value": c.html}]}}
        if channel == "sms":
            return url + f"/2010-04-01/Accounts/{sid}/Messages.json", {"headers": {"Authorization": basic}, "data": {
                "To": m.to, "From": "+886223456789", "Body": c.body}}
        return url + "/v1/projects/membercare-bench/messages:send", {
            "headers": {"Authorization": f"Bearer {access}"},
            "json": {"message": {"token": m.to, "notification": {"title": c.title, "body": c.body},
                                 "data": {**c.data, "membercare_message_id": m.message_id}}}}

    async def go():
        sem = asyncio.Semaphore(workers)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=workers)) as session:
            async def one(m):
                endpoint, kwargs = request(m)
                async with sem, session.post(endpoint, **kwargs) as resp:
                    await resp.read()
                    return resp.status

            return await asyncio.gather(*(one(m) for m in msgs))

    statuses = asyncio.run_coroutine_threadsafe(go(), send_loop()).result(timeout=300)
    if any(s >= 300 for s in statuses):
        raise SystemExit(f"raw {channel}: {sum(s >= 300 for s in statuses)} refused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per channel and mode")
    parser.add_argument("--workers", type=int, default=32, help="requests in flight")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the lowest CPU per mode is reported")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import httpx
    from dispatch_bench import make_service_account, sandbox_env
    from sandbox_ceiling import start_sandbox

    from channels.registry import build_channels, close_channels
    from membercare.delivery.send_loop import send_loop
    from membercare.models import Channel

    proc, url = start_sandbox(0.0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        httpx.post(url + "/sandbox/config", json={"engagement": {ch: {"unsubscribed": 0.0, "complained": 0.0}
                                                                  for ch in CHANNELS}}).raise_for_status()
        with tempfile.TemporaryDirectory() as tmp:
            sa_path = make_service_account(Path(tmp), url + "/token")
            adapters = build_channels(sandbox_env(url, sa_path), channels=[Channel(c) for c in CHANNELS])
        send_loop()
        access = adapters[Channel.PUSH]._credential
        offset = 0
        # Warm-up: connections, the OAuth token, imports.
        for ch in CHANNELS:
            warm = messages(ch, 2 * args.workers, 10**9)
            run_pool(adapters[Channel(ch)], warm, args.workers, asynchronous=False)
            run_loop(adapters[Channel(ch)], warm, args.workers)
        token = access.token
        for ch in CHANNELS:
            adapter = adapters[Channel(ch)]
            for _ in range(args.repeat):
                for mode in args.modes:
                    msgs = messages(ch, args.messages, offset)
                    offset += args.messages
                    load = os.getloadavg()[0]
                    s0, c0, w0 = _proc_cpu_s(proc.pid), time.process_time(), time.perf_counter()
                    if mode in ("threads", "async"):
                        run_pool(adapter, msgs, args.workers, asynchronous=mode == "async")
                    elif mode == "async8":
                        run_pool(adapter, msgs, args.workers, asynchronous=True, threads=8)
                    elif mode == "loop":
                        run_loop(adapter, msgs, args.workers)
                    else:
                        run_raw(url, ch, msgs, args.workers, token)
                    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                    sandbox = _proc_cpu_s(proc.pid) - s0
                    row = {"cpu_ms": 1000 * cpu / args.messages, "sandbox_cpu_ms": 1000 * sandbox / args.messages,
                           "per_s": args.messages / wall, "load1": load}
                    best = results.setdefault(ch, {}).get(mode)
                    if best is None or row["cpu_ms"] < best["cpu_ms"]:
                        results[ch][mode] = row
        close_channels(adapters)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine: do not lose the figures over a slow shutdown
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    print(f"dispatch transport: {args.messages} messages per channel and mode, {args.workers} in flight, best of "
          f"{args.repeat}; {os.cpu_count()} CPUs, /proc/loadavg {' '.join(loadavg)}")
    print(f"  {'channel':7s} {'mode':8s} {'CPU ms/msg':>10s} {'sandbox':>8s} {'msgs/s':>8s} {'load1':>6s}")
    for ch, modes in results.items():
        for mode, r in modes.items():
            print(f"  {ch:7s} {mode:8s} {r['cpu_ms']:10.3f} {r['sandbox_cpu_ms']:8.3f} {r['per_s']:8,.0f} "
                  f"{r['load1']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"messages": args.messages, "workers": args.workers, "repeat": args.repeat,
                                         "loadavg": loadavg, "results": results}, indent=2))


if __name__ == "__main__":
    main()
