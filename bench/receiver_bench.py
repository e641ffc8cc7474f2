"""Receiver load benchmark: a burst of SendGrid events through a real uvicorn server on loopback.

Posts ``--events`` (default 100,000) signed SendGrid Event Webhook events in batches of ``--batch``
(default 1,000, SendGrid's usual size) from ``--concurrency`` parallel senders to ``membercare``'s
receiver served by uvicorn in a separate process, then checks that the database holds exactly one row
per event. ``--retries`` re-posts that fraction of batches (SendGrid retries a batch whose answer it
did not see) to show that redelivery stores nothing twice.

Usage::

    .venv/bin/python bench/receiver_bench.py                       # SQLite (temporary file)
    .venv/bin/python bench/receiver_bench.py --postgres postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/receiver_bench.py --both --postgres ... # both, one after the other

Prints one line per backend: events/s over the burst, p50/p95/max request latency, and the stored count.
Exit status 1 if any event was lost or duplicated or any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = "receiver-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db_url: str, port: int) -> None:
    """The server process: migrated database, receiver app, uvicorn (access log off, as in production)."""
    import uvicorn

    from channels.sendgrid.webhooks import SendGridWebhookSigner
    from membercare.db import make_engine
    from membercare.receiver import ReceiverConfig, create_app

    config = ReceiverConfig(public_url=f"http://127.0.0.1:{port}",
                            sendgrid_public_key=SendGridWebhookSigner.from_seed(SEED).public_key_b64)
    engine = make_engine(db_url)
    uvicorn.run(create_app(config, engine), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def make_batches(total: int, batch: int, run: str) -> list[bytes]:
    """SendGrid-shaped batches: four events per message, a realistic mix including effects (hard
    bounces suppress, unsubscribes and spam reports revoke consent)."""
    start = int(time.time()) - 600
    out = []
    for b in range(0, total, batch):
        events = []
        for i in range(b, min(b + batch, total)):
            msg = i // 4
            step = i % 4
            kind = ("processed", "delivered", "open", "click")[step]
            e = {"email": f"member{msg}@example.com", "timestamp": start + i % 600, "event": kind,
                 "sg_event_id": f"{run}-{i}", "sg_message_id": f"msg{msg}.filterdrecv-bench-{i}",
                 "membercare_message_id": f"bench{msg:010d}", "category": ["bench"], "smtp-id": f"<{msg}@bench>"}
            if step == 1 and msg % 100 == 7:
                e.update(event="bounce", type="bounce", reason="550 5.1.1 no such user", status="5.1.1")
            elif step == 1 and msg % 50 == 3:
                e.update(event="deferred", response="421 try later", attempt="1")
            elif step == 3 and msg % 500 == 11:
                e.update(event="unsubscribe")
            elif step == 3 and msg % 1000 == 13:
                e.update(event="spamreport")
            elif kind == "click":
                e["url"] = f"https://shop.example.com/p/{msg % 97}?utm_source=membercare"
            events.append(e)
        out.append(json.dumps(events, separators=(",", ":")).encode())
    return out


def seed(db_url: str, messages: int) -> None:
    """One member and one sent outbox row per message, as after a real campaign (events resolve by message id)."""
    from datetime import datetime

    import sqlalchemy as sa

    from membercare.db import make_engine
    from membercare.delivery.models import CampaignRun, OutboxMessage
    from membercare.models import Member

    now = datetime.now(UTC)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        run_id = conn.execute(sa.insert(CampaignRun.__table__).returning(CampaignRun.__table__.c.id), dict(
            campaign="bench", occurrence="1", purpose="marketing", priority=0, as_of=now, status="completed",
            error_budget=0.25, counts="{}", created_at=now, updated_at=now)).scalar()
        members = [dict(external_id=f"B{k}", name=f"Member {k}", email=f"member{k}@example.com", country="TW",
                        locale="zh-TW", timezone="Asia/Taipei", joined_at=now, tier="silver", points_balance=0,
                        preferred_channels="email,sms,push", created_at=now, updated_at=now) for k in range(messages)]
        ids = conn.execute(sa.insert(Member.__table__).returning(Member.__table__.c.id, sort_by_parameter_order=True),
                           members).scalars().all()
        conn.execute(sa.insert(OutboxMessage.__table__), [dict(
            message_id=f"bench{k:010d}", run_id=run_id, campaign="bench", occurrence="1", member_id=ids[k],
            idempotency_key=f"bench|1|{ids[k]}", purpose="marketing", priority=0, channel="email",
            fallback_channels="", state="sent", reason_code="sent", reason="sent", attempts=1, transient_failures=0,
            scheduled_at=now, sent_at=now, created_at=now, updated_at=now) for k in range(messages)])
    engine.dispose()


def stored_count(db_url: str) -> int:
    import sqlalchemy as sa

    from membercare.db import make_engine

    engine = make_engine(db_url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM engagement_events")).scalar()
    engine.dispose()
    return n


def effect_counts(db_url: str) -> str:
    import sqlalchemy as sa

    from membercare.db import make_engine

    engine = make_engine(db_url)
    with engine.connect() as conn:
        sup = conn.execute(sa.text("SELECT count(*) FROM suppressions")).scalar()
        rev = conn.execute(sa.text("SELECT count(*) FROM consent_events WHERE NOT granted")).scalar()
        unresolved = conn.execute(sa.text("SELECT count(*) FROM engagement_events WHERE member_id IS NULL")).scalar()
    engine.dispose()
    return f"effects: {sup} suppressions, {rev} consent revocations, {unresolved} events without member"


def run_backend(label: str, db_url: str, args) -> bool:
    import httpx

    from channels.sendgrid.webhooks import SendGridWebhookSigner
    from membercare.db import upgrade

    upgrade(db_url)
    seed(db_url, (args.events + 3) // 4)
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", db_url, "--port", str(port)], cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                print(f"{label}: server did not start", file=sys.stderr)
                return False
            time.sleep(0.2)

        signer = SendGridWebhookSigner.from_seed(SEED)
        batches = make_batches(args.events, args.batch, uuid.uuid4().hex[:8])
        n_retry = int(len(batches) * args.retries)
        plan = batches + batches[:n_retry]  # redeliveries at the end, after their originals were answered
        latencies: list[float] = []
        failures: list[str] = []

        def post(body: bytes, client: httpx.Client) -> None:
            t = time.perf_counter()
            r = client.post("/webhooks/sendgrid", content=body,
                            headers={"Content-Type": "application/json", **signer.sign(body)})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")

        clients = [httpx.Client(base_url=base, timeout=120) for _ in range(args.concurrency)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda ib: post(ib[1], clients[ib[0] % args.concurrency]), enumerate(plan)))
        elapsed = time.perf_counter() - started
        for c in clients:
            c.close()
        stored = stored_count(db_url)
        lat = sorted(latencies)
        p95 = lat[int(len(lat) * 0.95) - 1] if lat else 0.0
        effects = effect_counts(db_url)
        ok = not failures and stored == args.events
        print(f"{label:10s} {args.events:,} events in {len(batches)} batches of {args.batch} "
              f"(+{n_retry} redelivered), concurrency {args.concurrency}: {elapsed:.2f} s, "
              f"{args.events / elapsed:,.0f} events/s; request p50 {statistics.median(lat) * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms; stored {stored:,} "
              f"({'OK' if ok else 'MISMATCH'}); failed requests {len(failures)}; {effects}")
        for f in failures[:5]:
            print("   ", f)
        return ok
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--retries", type=float, default=0.05, help="fraction of batches posted twice")
    p.add_argument("--postgres", default=os.environ.get("MEMBERCARE_TEST_POSTGRES_URL"),
                   help="admin URL of a PostgreSQL server (a fresh database is created and dropped)")
    p.add_argument("--both", action="store_true", help="SQLite, then PostgreSQL")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0

    ok = True
    if args.both or not args.postgres:
        with tempfile.TemporaryDirectory() as tmp:
            ok &= run_backend("sqlite", f"sqlite:///{tmp}/bench.db", args)
    if args.postgres:
        import sqlalchemy as sa

        from membercare.db import make_engine

        name = f"mc_bench_{uuid.uuid4().hex[:8]}"
        admin = make_engine(args.postgres)
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            url = sa.engine.make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
            ok &= run_backend("postgresql", url, args)
        finally:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
