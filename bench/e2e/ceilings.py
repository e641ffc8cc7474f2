"""The ceilings and the reference a run's figures are held against, measured in the same run.

* :func:`planning_ceiling`: the bare cost of producing and storing one message: the campaign's compiled
  templates rendered straight by Jinja (``Template.render``, no size bounds, no fallback channels, no routing,
  no policies, no coupons) for the channel each member was sent on, with the template variables built
  *before* the clock starts, then the rendered parts JSON-encoded and inserted with one ``executemany`` into a
  scratch SQLite table. Planning does all of that and more; the ratio says how much more.
* :func:`dispatch_ceiling`: ``bench/dispatch_transport.py`` in its own process with the ``raw`` mode (a
  minimal aiohttp client posting requests of the providers' shapes, 32 in flight, no SDK, no database) and
  the ``async`` mode (our adapters' SDK-built requests on the send loop, no database), weighted by the run's
  channel mix.
* :func:`segments_reference`: ``bench/segments_bench.py`` on a copy of the run's shop: RFM scoring and every
  standard segment on SQLite and on DuckDB (the same segment builders compiled for DuckDB).

Each returns a dict for ``results.json``; a failure is reported in it (``error``), not raised: a missing
reference must not lose the campaign's figures.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent.parent


def planning_ceiling(db_url: str, templates: Path, campaign: str, as_of: datetime, env: Mapping[str, str],
                     sample: int = 5000) -> dict:
    """CPU ms per message of bare render + insert for up to ``sample`` of the run's sent messages; ``env`` is the
    run's environment (the secret key signs the links the templates render)."""
    from membercare.config import Settings
    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage
    from membercare.models import Channel
    from membercare.rendering.engine import Part
    from membercare.rendering.renderer import CampaignRenderer

    parts = {Channel.EMAIL: (Part.EMAIL_SUBJECT, Part.EMAIL_PREHEADER, Part.EMAIL_HTML, Part.EMAIL_TEXT),
             Channel.SMS: (Part.SMS,), Channel.PUSH: (Part.PUSH_TITLE, Part.PUSH_BODY)}
    from bench.e2e.harness import patched_environ

    with patched_environ({**env, "MEMBERCARE_DATABASE_URL": db_url, "MEMBERCARE_TEMPLATES_DIR": str(templates)}):
        renderer = CampaignRenderer(campaign, Settings.from_env())
    engine = make_engine(db_url)
    o = OutboxMessage.__table__
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(o.c.member_id, o.c.channel)
                                .where(o.c.campaign == campaign, o.c.state == "sent")
                                .order_by(o.c.id).limit(sample)).all()
            contexts = renderer.build_context(conn, [r.member_id for r in rows], as_of)
    finally:
        engine.dispose()
    jobs = []
    for r in rows:
        channel = Channel(r.channel)
        if channel not in parts or r.member_id not in contexts:
            continue
        ctx = contexts[r.member_id]
        locale = renderer.template_locale(channel, ctx["member"].get("locale"))
        # Variables are context building, which the ceiling leaves out: built before the clock starts.
        v = renderer._vars(channel, ctx, locale, f"{r.member_id:032x}", as_of)  # bench: the renderer's own variables
        if channel == Channel.EMAIL:
            v = {**v, "subject": "", "preheader": ""}
        compiled = [renderer._part(p, locale) for p in parts[channel]]
        jobs.append((r.member_id, r.channel, v, [c.template for c in compiled if c is not None]))
    if not jobs:
        return {"error": "no sent messages to render"}
    with tempfile.TemporaryDirectory(prefix="membercare-ceiling-") as tmp:
        scratch = sqlite3.connect(Path(tmp) / "scratch.sqlite")
        scratch.execute("PRAGMA journal_mode=WAL")
        scratch.execute("CREATE TABLE message (id INTEGER PRIMARY KEY, member_id INTEGER, channel TEXT, content TEXT)")
        w0, c0 = time.perf_counter(), time.process_time()
        out = [(mid, ch, json.dumps([t.render(v) for t in tpls], ensure_ascii=False)) for mid, ch, v, tpls in jobs]
        scratch.executemany("INSERT INTO message (member_id, channel, content) VALUES (?, ?, ?)", out)
        scratch.commit()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        scratch.close()
    return {"messages": len(jobs), "cpu_ms_per_message": round(1000 * cpu / len(jobs), 4),
            "wall_ms_per_message": round(1000 * wall / len(jobs), 4),
            "what": "compiled templates rendered by Jinja for the sent channel + JSON + executemany insert"}


def dispatch_ceiling(sent_by_channel: Mapping[str, int], messages: int = 2000, workers: int = 32,
                     timeout_s: float = 900) -> dict:
    """CPU ms per message of raw aiohttp sends and of our SDK transport alone, weighted by the channel mix."""
    mix = {ch: n for ch, n in sent_by_channel.items() if ch in ("email", "sms", "push") and n}
    if not mix:
        return {"error": "no e-mail, SMS or push message was sent"}
    with tempfile.TemporaryDirectory(prefix="membercare-ceiling-") as tmp:
        path = Path(tmp) / "transport.json"
        cmd = [sys.executable, str(ROOT / "bench" / "dispatch_transport.py"), "--modes", "raw", "async",
               "--messages", str(messages), "--workers", str(workers), "--repeat", "1", "--json", str(path)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not path.is_file():
            return {"error": f"dispatch_transport.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        data = json.loads(path.read_text())
    per = data["results"]
    total = sum(mix.values())

    def weighted(mode: str, key: str) -> float | None:
        try:
            return round(sum(per[ch][mode][key] * n for ch, n in mix.items()) / total, 4)
        except KeyError:
            return None

    return {"messages_per_channel": messages, "in_flight": workers, "channel_mix": mix,
            "raw_cpu_ms_per_message": weighted("raw", "cpu_ms"),
            "sdk_async_cpu_ms_per_message": weighted("async", "cpu_ms"),
            "raw_sandbox_cpu_ms_per_message": weighted("raw", "sandbox_cpu_ms"),
            "by_channel": {ch: {m: round(r["cpu_ms"], 4) for m, r in modes.items()} for ch, modes in per.items()},
            "loadavg": data.get("loadavg")}


def segments_reference(shop: Path, members: int, workdir: Path, timeout_s: float = 3600) -> dict:
    """RFM scoring and every standard segment on SQLite and DuckDB, on a copy of ``shop`` (same data)."""
    seg_dir = workdir / f"segments-{members}"
    seg_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(shop, seg_dir / f"shop_{members}.db")  # segments_bench's name for a size's shop
        path = seg_dir / "segments.json"
        cmd = [sys.executable, str(ROOT / "bench" / "segments_bench.py"), "--sizes", str(members),
               "--backends", "sqlite,duckdb", "--skip-churn", "--repeat", "2", "--workdir", str(seg_dir),
               "--json", str(path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not path.is_file():
            return {"error": f"segments_bench.py exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        data = json.loads(path.read_text())
    finally:
        shutil.rmtree(seg_dir, ignore_errors=True)
    res = next(iter(data["sizes"].values()))["results"]
    sq, duck = res.get("sqlite", {}), res.get("duckdb", {})
    steps = []
    for name, row in sq.items():
        ref = duck.get(name)
        if not ref or name == "rfm score":  # scoring writes on SQLite but only builds a temp table on DuckDB
            continue
        ratio = row["seconds"] / ref["seconds"] if ref["seconds"] else None
        steps.append({"step": name, "sqlite_s": round(row["seconds"], 3), "duckdb_s": round(ref["seconds"], 3),
                      "ratio": round(ratio, 2) if ratio is not None else None,
                      "counts_agree": row.get("count") == ref.get("count")})
    worst = max((s for s in steps if s["ratio"] is not None), key=lambda s: s["ratio"], default=None)
    return {"steps": steps, "worst": worst, "all_counts_agree": all(s["counts_agree"] for s in steps),
            "sqlite_total_s": round(sum(s["sqlite_s"] for s in steps), 2),
            "duckdb_total_s": round(sum(s["duckdb_s"] for s in steps), 2)}
