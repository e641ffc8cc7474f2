"""Outputs of ``membercare bench``: the target verdicts, the scaling verdict, results.md and the scaling chart.

Everything here works on the plain ``results`` dict that :func:`bench.e2e.harness.run_bench` builds
(and writes as results.json), so a report can be rebuilt from an old results.json without rerunning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The issue's targets on a 2-core machine.
PLAN_RENDER_1M_S = 120.0
DISPATCH_1M_S = 600.0
MEMORY_1M_MB = 1024.0
RATIO_AT_10K = 20.0
# Issue 18's targets: CPU per unit and ratios measured in one run.
PLAN_CPU_MS = 0.25  # planning + rendering, ms of CPU per member (flow process + planning workers)
DISPATCH_CPU_MS = 0.30  # our dispatcher side, ms of CPU per sent message (sandbox and receiver excluded)
CEILING_FACTOR = 2.5  # both within this factor of their ceiling measured in the same run
CAMPAIGN_1M_S = 480.0  # segment to last send at 1M members
FLOW_MEMORY_1M_MB = 300.0  # the flow process alone
CPU_RATIO_AT_10K = 30.0
SEGMENTS_DUCKDB_FACTOR = 3.0
# Scaling verdicts: time grows at most this fast (log-log slope), memory at most this fast.
LINEAR_SLOPE_MAX = 1.15
FLAT_MEMORY_SLOPE_MAX = 0.10

STAGE_ORDER = ("segment", "plan_render", "dispatch", "summarise", "webhooks")
STAGE_LABELS = {"segment": "segment", "plan_render": "plan and render", "dispatch": "dispatch",
                "summarise": "summarise", "webhooks": "webhook ingestion"}


# ---------------------------------------------------------------------------------------------- verdicts


def _size(results: dict[str, Any], members: int) -> dict[str, Any] | None:
    return next((s for s in results.get("sizes", []) if s["members"] == members), None)


# Baseline errors that mean there is no throughput to compare with (the others are notes on a measured run).
_NO_MEASUREMENT = ("baseline not available", "measurement failed")


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Our campaign flow's messages/s over the naive flow's, per baseline size.

    Ours is measured on the shop of the same number of members (so slightly fewer messages, after the
    holdout: the comparison is conservative); without that size, on the nearest one (said in the row).
    """
    out = []
    sizes = results.get("sizes", [])
    for b in results.get("baseline", []):
        n = b.get("messages")
        row: dict[str, Any] = {"messages": n}
        if not b.get("messages_per_s") or str(b.get("error") or "").startswith(_NO_MEASUREMENT):
            row["error"] = b.get("error") or "the baseline measured no throughput"
            out.append(row)
            continue
        if not sizes:
            row["error"] = "no campaign size measured to compare with"
            out.append(row)
            continue
        ours = _size(results, n) or min(sizes, key=lambda s: abs(math.log(s["members"] / n)))
        ours_rate = ours["campaign_flow"]["messages_per_s"] or 0.0
        row.update({"ours_members": ours["members"], "ours_messages_per_s": ours_rate,
                    "baseline_messages_per_s": b["messages_per_s"],
                    "ratio": round(ours_rate / b["messages_per_s"], 1)})
        # By CPU per sent message: everything but the providers (sandbox) and the receiver, on both sides
        # (ours: flow process, workers and Prefect's server; theirs: the flow process and Prefect's server).
        ours_cpu = ours["campaign_flow"].get("cpu_ms_per_message")
        theirs_cpu = (1000 * ((b.get("cpu_seconds") or 0.0) + (b.get("server_cpu_seconds") or 0.0)) / b["sent"]
                      if b.get("sent") and b.get("cpu_seconds") else None)
        if ours_cpu and theirs_cpu:
            row.update({"ours_cpu_ms_per_message": ours_cpu, "baseline_cpu_ms_per_message": round(theirs_cpu, 3),
                        "cpu_ratio": round(theirs_cpu / ours_cpu, 1)})
        if b.get("error"):
            # The naive flow ran but went wrong on the way (lost task-run records, failed or duplicate sends):
            # its throughput counts only the sends its ledger recorded, and the ratio carries what went wrong.
            row["note"] = b["error"]
        out.append(row)
    return out


def _verdict(name: str, target: str, figure: float | None, limit: float, unit: str, higher_is_better: bool = False,
             where: str = "", decimals: int = 1) -> dict[str, Any]:
    if figure is None:
        return {"name": name, "target": target, "figure": None, "status": "not measured",
                "line": f"{target}: not measured{where}"}
    met = figure >= limit if higher_is_better else figure <= limit
    fig = f"{figure:,.{decimals}f}{unit}"
    return {"name": name, "target": target, "figure": round(figure, 4), "status": "met" if met else "missed",
            "line": f"{target}: {'met' if met else 'MISSED'} ({fig}{where})"}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target of the issue: met / missed (with the figure) / not measured."""
    big = _size(results, 1_000_000)
    where = " at 1M members" if big else " (no 1M-member run)"
    plan = disp = mem = None
    if big:
        st = big["stages"]
        plan = st["segment"]["seconds"] + st["plan_render"]["seconds"]
        disp = st["dispatch"]["seconds"]
        mem = (big["peak_rss_mb"].get("harness") or 0.0) + (big["peak_rss_mb"].get("workers") or 0.0)
    ratio_rows = results.get("ratios") or ratios(results)
    ratio = next((r.get("ratio") for r in ratio_rows if r.get("messages") == 10_000), None)
    return issue8(plan, disp, mem, ratio, where) + issue18(results, ratio_rows)


def _largest(results: dict[str, Any]) -> dict[str, Any] | None:
    sizes = results.get("sizes", [])
    return max(sizes, key=lambda s: s["members"]) if sizes else None


def issue18(results: dict[str, Any], ratio_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's verdicts: CPU per unit against fixed targets and against the ceilings of the same run (at the
    largest size measured), the 1M wall time and memory, the CPU and wall ratios at 10k, segments vs DuckDB."""
    out = []
    top = _largest(results)
    at = f" at {top['members']:,} members" if top else ""
    plan_cpu = disp_cpu = plan_x = disp_x = None
    if top:
        plan_cpu = top["stages"]["plan_render"].get("ours_cpu_ms_per_unit")
        disp_cpu = top["stages"]["dispatch"].get("ours_cpu_ms_per_unit")
        pc = (top.get("planning_ceiling") or {}).get("cpu_ms_per_message")
        dc = (top.get("dispatch_ceiling") or {}).get("raw_cpu_ms_per_message")
        plan_x = plan_cpu / pc if plan_cpu and pc else None
        disp_x = disp_cpu / dc if disp_cpu and dc else None
    out.append(_verdict("plan_cpu", "planning + rendering CPU per member (flow process + workers) at most "
                        f"{PLAN_CPU_MS} ms", plan_cpu, PLAN_CPU_MS, " ms", where=at, decimals=3))
    out.append(_verdict("plan_ceiling", f"planning + rendering within {CEILING_FACTOR}x of bare render + insert "
                        "(same run)", plan_x, CEILING_FACTOR, "x", where=at))
    out.append(_verdict("dispatch_cpu", "our dispatcher side's CPU per sent message (sandbox excluded) at most "
                        f"{DISPATCH_CPU_MS} ms", disp_cpu, DISPATCH_CPU_MS, " ms", where=at, decimals=3))
    out.append(_verdict("dispatch_ceiling", f"dispatcher side within {CEILING_FACTOR}x of raw aiohttp sends "
                        "(same run)", disp_x, CEILING_FACTOR, "x", where=at))
    big = _size(results, 1_000_000)
    where = " at 1M members" if big else " (no 1M-member run)"
    wall = big["campaign_flow"]["seconds"] if big else None
    flow_mem = big["peak_rss_mb"].get("harness") if big else None
    out.append(_verdict("campaign_1m", f"1M-member campaign, segment to last send, at most {CAMPAIGN_1M_S:.0f} s",
                        wall, CAMPAIGN_1M_S, " s", where=where))
    out.append(_verdict("flow_memory_1m", f"flow process memory at most {FLOW_MEMORY_1M_MB:.0f} MB at 1M", flow_mem,
                        FLOW_MEMORY_1M_MB, " MB", where=where))
    at10k = next((r for r in ratio_rows if r.get("messages") == 10_000 and r.get("ours_members") == 10_000), None)
    out.append(_verdict("cpu_ratio_10k", f"at least {CPU_RATIO_AT_10K:.0f}x the plain Prefect flow by CPU per "
                        "message at 10k, same shop and work", (at10k or {}).get("cpu_ratio"), CPU_RATIO_AT_10K, "x",
                        higher_is_better=True))
    out.append(_verdict("wall_ratio_10k", f"at least {RATIO_AT_10K:.0f}x the plain Prefect flow by wall at 10k, "
                        "same shop and work", (at10k or {}).get("ratio"), RATIO_AT_10K, "x", higher_is_better=True))
    seg_size = big or top
    seg = (seg_size or {}).get("segments") or {}
    worst = (seg.get("worst") or {}).get("ratio")
    seg_where = (f" at {seg_size['members']:,} members, worst: {seg['worst']['step']}"
                 if seg_size and seg.get("worst") else "")
    out.append(_verdict("segments_duckdb", "every standard segment and RFM on SQLite within "
                        f"{SEGMENTS_DUCKDB_FACTOR:.0f}x of DuckDB", worst, SEGMENTS_DUCKDB_FACTOR, "x",
                        where=seg_where))
    return out


def issue8(plan: float | None, disp: float | None, mem: float | None, ratio: float | None,
           where: str) -> list[dict[str, Any]]:
    return [
        _verdict("plan_render_1m", "1M-member campaign segmented, planned and rendered in under 2 minutes", plan,
                 PLAN_RENDER_1M_S, " s", where=where),
        _verdict("dispatch_1m", "1M-member campaign dispatched at zero provider latency in under 10 minutes", disp,
                 DISPATCH_1M_S, " s", where=where),
        _verdict("memory_1m", "peak memory of the campaign process (and its workers) under 1 GB at 1M", mem,
                 MEMORY_1M_MB, " MB", where=where),
        _verdict("ratio_10k", "at least 20x the plain Prefect implementation's throughput at 10,000 messages", ratio,
                 RATIO_AT_10K, "x", higher_is_better=True),
    ]


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / den if den else 0.0


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; (a, b). One point: the line through the origin and it."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0] if xs[0] else 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0
    return my - b * mx, b


def scaling_verdict(points: Sequence[tuple[int, float, float]]) -> dict[str, Any]:
    """Does time grow linearly with members and memory stay flat? ``points`` = (members, seconds, peak MB).

    Time: the log-log slope of seconds against members (1 = linear; below 1 when a fixed cost still
    dominates the small sizes) must be at most 1.15. Memory: the log-log slope of the peak must be at most
    0.10 (100x the members, at most 1.6x the memory). Needs two sizes at least a factor 5 apart.
    """
    pts = sorted(p for p in points if p[0] > 0 and p[1] > 0)
    if len({p[0] for p in pts}) < 2 or pts[-1][0] / pts[0][0] < 5:
        return {"status": "not measured", "line": "scaling: needs two sizes at least 5x apart"}
    xs = [p[0] for p in pts]
    t_slope = _slope(xs, [p[1] for p in pts])
    mem = [p for p in pts if p[2] > 0]
    m_slope = _slope([p[0] for p in mem], [p[2] for p in mem]) if len(mem) >= 2 else None
    linear = t_slope <= LINEAR_SLOPE_MAX
    flat = m_slope is not None and m_slope <= FLAT_MEMORY_SLOPE_MAX
    per_member_us = [round(p[1] / p[0] * 1e6, 1) for p in pts]
    a, b = linear_fit(xs, [p[1] for p in pts])
    line = (f"time {'grows linearly' if linear else 'grows faster than linearly'} (log-log slope {t_slope:.2f}; "
            f"{' / '.join(f'{u:g}' for u in per_member_us)} us per member at "
            f"{' / '.join(f'{x:,}' for x in xs)} members); memory "
            + ("not measured" if m_slope is None else
               f"{'stays flat' if flat else 'grows'} "
               f"(slope {m_slope:.2f}: {pts[0][2]:,.0f} MB -> {pts[-1][2]:,.0f} MB)"))
    return {"status": "met" if linear and flat else "missed", "time_slope": round(t_slope, 3),
            "memory_slope": None if m_slope is None else round(m_slope, 3), "time_linear": linear,
            "memory_flat": flat, "us_per_member": per_member_us, "fit_intercept_s": round(a, 3),
            "fit_s_per_member": b, "line": line}


# ------------------------------------------------------------------------------------------------- chart


def scaling_chart(results: dict[str, Any]):
    """Altair chart: campaign time per stage vs members (log-log, with the linear fit dashed), peak RSS, and the
    CPU per unit of planning and dispatch beside their ceilings of the same run and the targets."""
    import altair as alt

    sizes = sorted(results.get("sizes", []), key=lambda s: s["members"])
    time_rows, mem_rows = [], []
    for s in sizes:
        n = s["members"]
        time_rows.append({"members": n, "series": "campaign flow (total)", "seconds": s["campaign_flow"]["seconds"]})
        for st in ("segment", "plan_render", "dispatch", "webhooks"):
            secs = s["stages"][st]["seconds"]
            if secs > 0:
                time_rows.append({"members": n, "series": STAGE_LABELS[st], "seconds": secs})
        for proc in ("harness", "workers", "sandbox", "receiver"):
            v = s["peak_rss_mb"].get(proc)
            if v:
                mem_rows.append({"members": n, "process": proc if proc != "harness" else "campaign process",
                                 "peak_rss_mb": v})
    xs = [s["members"] for s in sizes]
    fit_rows = []
    if xs:
        a, b = linear_fit(xs, [s["campaign_flow"]["seconds"] for s in sizes])
        lo, hi = min(xs), max(xs)
        steps = 24
        for i in range(steps + 1):
            x = lo * (hi / lo) ** (i / steps) if hi > lo else lo
            y = a + b * x
            if y > 0:
                fit_rows.append({"members": x, "seconds": y, "series": "linear fit of the total"})
    xscale = alt.Scale(type="log")
    x = alt.X("members:Q", scale=xscale, title="members (log)")
    points = alt.Chart(alt.Data(values=time_rows)).mark_line(point=True).encode(
        x=x, y=alt.Y("seconds:Q", scale=alt.Scale(type="log"), title="seconds (log)"),
        color=alt.Color("series:N", title=None), tooltip=["series:N", "members:Q", "seconds:Q"])
    fit = alt.Chart(alt.Data(values=fit_rows)).mark_line(strokeDash=[6, 4], color="#888888").encode(
        x=x, y=alt.Y("seconds:Q", scale=alt.Scale(type="log")), detail="series:N")
    left = alt.layer(points, fit).properties(title="Time per stage vs members", width=360, height=260)
    right = alt.Chart(alt.Data(values=mem_rows)).mark_line(point=True).encode(
        x=x, y=alt.Y("peak_rss_mb:Q", title="peak RSS (MB)", scale=alt.Scale(zero=True)),
        color=alt.Color("process:N", title=None), tooltip=["process:N", "members:Q", "peak_rss_mb:Q"],
    ).properties(title="Peak memory vs members", width=300, height=260)
    cpu_rows = []
    for s in sizes:
        n = s["members"]
        for st, label in (("plan_render", "plan + render (ours)"), ("dispatch", "dispatch (ours)")):
            v = s["stages"][st].get("ours_cpu_ms_per_unit")
            if v:
                cpu_rows.append({"members": n, "series": label, "cpu_ms": v})
        for key, field, label in (("planning_ceiling", "cpu_ms_per_message", "ceiling: bare render + insert"),
                                  ("dispatch_ceiling", "raw_cpu_ms_per_message", "ceiling: raw aiohttp")):
            v = (s.get(key) or {}).get(field)
            if v:
                cpu_rows.append({"members": n, "series": label, "cpu_ms": v})
    if not cpu_rows:
        return alt.hconcat(left, right).resolve_scale(color="independent")
    targets_rows = [{"cpu_ms": PLAN_CPU_MS, "target": "plan target"},
                    {"cpu_ms": DISPATCH_CPU_MS, "target": "dispatch target"}]
    cpu = alt.layer(
        alt.Chart(alt.Data(values=cpu_rows)).mark_line(point=True).encode(
            x=x, y=alt.Y("cpu_ms:Q", title="CPU ms per member / message", scale=alt.Scale(zero=True)),
            color=alt.Color("series:N", title=None), tooltip=["series:N", "members:Q", "cpu_ms:Q"]),
        alt.Chart(alt.Data(values=targets_rows)).mark_rule(strokeDash=[2, 3], color="#b22222").encode(
            y="cpu_ms:Q", tooltip=["target:N", "cpu_ms:Q"]),
    ).properties(title="CPU per unit vs members (targets dotted)", width=300, height=260)
    return alt.hconcat(left, right, cpu).resolve_scale(color="independent")


def write_chart(out: Path, results: dict[str, Any]) -> tuple[Path, Path | None]:
    """scaling.svg and scaling.png (the PNG is skipped, None, if the renderer cannot make one)."""
    import vl_convert as vlc

    spec = scaling_chart(results).to_dict()
    svg = out / "scaling.svg"
    svg.write_text(vlc.vegalite_to_svg(spec), encoding="utf-8")
    png = out / "scaling.png"
    try:
        png.write_bytes(vlc.vegalite_to_png(spec, scale=2))
    except Exception:  # noqa: BLE001 - the SVG is the primary output
        return svg, None
    return svg, png


# ---------------------------------------------------------------------------------------------- markdown


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def markdown(results: dict[str, Any], chart: str | None = "scaling.svg") -> str:
    m = results.get("machine", {})
    pk = m.get("packages", {})
    lines = ["# membercare end-to-end benchmark", "",
             f"`{results.get('command', 'membercare bench')}` · started {results.get('started_at', '?')}, "
             f"finished {results.get('finished_at', '?')}", "",
             f"Machine: {m.get('cpus')} cores ({m.get('cpu_model', 'unknown CPU')}), {m.get('memory_gib', '?')} GiB, "
             f"{m.get('platform', '')}; Python {m.get('python')}, SQLite {m.get('sqlite')}"
             + (f", PostgreSQL {m['postgres']}" if m.get("postgres") else "")
             + f"; prefect {pk.get('prefect')}, sendgrid {pk.get('sendgrid')}, twilio {pk.get('twilio')}, "
               f"firebase-admin {pk.get('firebase-admin')}" + (f"; code {m['git']}" if m.get("git") else "") + ".",
             f"Load average (1/5/15 min) before {results.get('load_before')}, after {results.get('load_after')}. "
             f"Database: {results.get('options', {}).get('db')}. Provider latency 0 ms. "
             f"Prefect start-up (not measured in any stage): {_f(results.get('prefect_startup_s'))} s.", ""]
    lines += ["## Targets", ""]
    for t in results.get("targets") or targets(results):
        lines.append(f"- {t['line']}")
    sc = results.get("scaling")
    if sc:
        lines.append(f"- scaling ({sc['status']}): {sc['line']}")
    lines.append("")

    sizes = results.get("sizes", [])
    if sizes:
        lines += ["## Campaign per shop size", "",
                  "| members | audience | sent | holdout | segment s | plan+render s | dispatch s | webhooks s "
                  "| campaign msg/s | peak RSS MB | task runs | Prefect share | load 1m | exactly once |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in sizes:
            st, fl = s["stages"], s["campaign_flow"]
            lines.append(
                f"| {s['members']:,} | {s['audience']:,} | {s['sent']:,} | {_pct(s['holdout_share'])} "
                f"| {_f(st['segment']['seconds'])} | {_f(st['plan_render']['seconds'])} "
                f"| {_f(st['dispatch']['seconds'])} "
                f"| {_f(st['webhooks']['seconds'])} | {_f(fl['messages_per_s'], 0)} "
                f"| {_f((s['peak_rss_mb'].get('harness') or 0) + (s['peak_rss_mb'].get('workers') or 0), 0)} "
                f"| {fl['task_runs']:,} | {_pct(fl['prefect_share'])} | {s['load_before'][0]} "
                f"| {'yes' if s['verify']['exactly_once'] else 'NO'} |")
        lines.append("")
        for s in sizes:
            lines += [f"### {s['members']:,} members", "",
                      f"Audience {s['audience']:,}, ledger rows {s['planned']:,}, sent {s['sent']:,} "
                      f"({', '.join(f'{k} {v:,}' for k, v in sorted(s['ledger']['sent_by_channel'].items()))}), "
                      f"holdout {s['holdout']:,}; engagement events stored {s['ledger']['events_total']:,}. "
                      f"Shop {'from the cache' if s['shop'].get('cached') else 'generated now'} "
                      f"(generation {_f(s['shop'].get('generation_s'))} s, not a campaign stage). "
                      f"Load {s['load_before']} -> {s['load_after']}.", "",
                      "| stage | seconds | messages | messages/s | peak RSS MB (campaign process) "
                      "| worker processes MB | Prefect task runs | Prefect share |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name in STAGE_ORDER:
                r = s["stages"][name]
                lines.append(f"| {STAGE_LABELS[name]} | {_f(r['seconds'], 2)} | {_f(r['messages'])} "
                             f"| {_f(r['messages_per_s'], 0)} | {_f(r['peak_rss_mb'], 0)} "
                             f"| {_f(r['children_peak_rss_mb'], 0)} | {r['task_runs']:,} "
                             f"| {_pct(r['prefect_share'])} |")
            fl = s["campaign_flow"]
            lines.append(f"| **campaign flow** | **{_f(fl['seconds'], 2)}** | {_f(fl['messages'])} "
                         f"| **{_f(fl['messages_per_s'], 0)}** | {_f(fl['peak_rss_mb'], 0)} "
                         f"| {_f(fl['children_peak_rss_mb'], 0)} | {fl['task_runs']:,} | {_pct(fl['prefect_share'])} |")
            w = s["stages"]["webhooks"]
            p = s["peak_rss_mb"]
            v = s["verify"]
            lines += ["",
                      f"Webhooks: {w['messages']:,} events; tail after dispatch {_f(w.get('tail_seconds'), 1)} s, "
                      f"sync-engagement {_f(w.get('sync_seconds'), 1)} s; ingestion rate over the window from "
                      f"dispatch start to drained: {_f(w['messages_per_s'], 0)} events/s"
                      + ("" if w.get("drained", True) else f" (NOT drained: {w.get('pending_at_end')} pending)") + ".",
                      f"Peak RSS: sandbox {_f(p.get('sandbox'), 0)} MB, receiver {_f(p.get('receiver'), 0)} MB"
                      + (f", Prefect's local server {_f(p.get('prefect_server'), 0)} MB"
                         if p.get("prefect_server") else "")
                      + ".",
                      f"Exactly once: ledger sent {v['ledger_sent']:,}, sandbox accepted {v['sandbox_accepted']:,}, "
                      f"duplicates {v['duplicates']}"
                      + (f", by message id: missing {v['missing_at_sandbox']}, unknown {v['unknown_at_sandbox']}, "
                         f"more than once {v['received_more_than_once']}" if v.get("ids_checked") else "")
                      + f" -> {'yes' if v['exactly_once'] else 'NO'}.", ""]
            lines += _cpu_lines(s)

    base = results.get("baseline", [])
    if base:
        lines += ["## The plain Prefect implementation (one task per message)", "",
                  "| messages | sent | failed | seconds | messages/s | task runs | Prefect seconds | peak RSS MB "
                  "| load 1m | note |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for b in base:
            lines.append(f"| {_f(b.get('messages'))} | {_f(b.get('sent'))} | {_f(b.get('failed'))} "
                         f"| {_f(b.get('seconds'))} | {_f(b.get('messages_per_s'))} | {_f(b.get('task_runs'))} "
                         f"| {_f(b.get('prefect_seconds'))} | {_f(b.get('peak_rss_mb'), 0)} "
                         f"| {(b.get('load_before') or ['-'])[0]} | {b.get('error') or ''} |")
        lines.append("")
        for r in results.get("ratios") or ratios(results):
            if r.get("error"):
                lines.append(f"- at {_f(r['messages'])} messages: no ratio ({r['error']})")
            else:
                lines.append(f"- at {r['messages']:,} messages: ours {r['ours_messages_per_s']:,.0f} msg/s "
                             f"(campaign flow on the {r['ours_members']:,}-member shop) vs "
                             f"{r['baseline_messages_per_s']:,.1f} msg/s: **{r['ratio']:,.1f}x** by wall"
                             + (f"; CPU per sent message {r['ours_cpu_ms_per_message']:,.2f} ms vs "
                                f"{r['baseline_cpu_ms_per_message']:,.2f} ms: **{r['cpu_ratio']:,.1f}x** by CPU"
                                if r.get("cpu_ratio") else "")
                             + (f" (the plain flow: {r['note']})" if r.get("note") else ""))
        lines.append("")
    if chart and sizes:
        lines += ["## Scaling", "", f"![time and peak memory against members]({chart})", ""]
        if sc:
            lines += [sc["line"], ""]
    lines += ["How to read these figures: docs/benchmark.md.", ""]
    return "\n".join(lines)


_CPU_GROUPS = (("flow", "flow process"), ("workers", "workers"), ("prefect_server", "Prefect server"),
               ("sandbox", "sandbox (providers)"), ("receiver", "receiver"))


def _cpu_lines(s: dict[str, Any]) -> list[str]:
    """CPU ms per unit of each stage and process group, then the ceilings and the segments of the same run."""
    if not any(s["stages"][n].get("cpu_ms_per_unit") for n in STAGE_ORDER):
        return []
    lines = ["CPU ms per unit (member planned, message sent, event stored) by process; \"ours\" is the flow "
             "process and its workers (planning workers, dispatcher processes):", "",
             "| stage | unit | " + " | ".join(label for _, label in _CPU_GROUPS) + " | ours |",
             "|---|---:|" + "---:|" * (len(_CPU_GROUPS) + 1)]
    for name in STAGE_ORDER:
        r = s["stages"][name]
        per = r.get("cpu_ms_per_unit") or {}
        lines.append(f"| {STAGE_LABELS[name]} | {_f(r['messages'])} | "
                     + " | ".join(_f(per.get(k), 3) for k, _ in _CPU_GROUPS)
                     + f" | {_f(r.get('ours_cpu_ms_per_unit'), 3)} |")
    fl = s["campaign_flow"]
    if fl.get("cpu_ms_per_message") is not None:
        lines.append(f"| **campaign flow** | {_f(fl['messages'])} sent | "
                     + " | ".join(_f(1000 * (fl["cpu_s"].get(k) or 0) / fl["messages"], 3) if fl["messages"] else "-"
                                  for k, _ in _CPU_GROUPS)
                     + f" | {_f(fl['cpu_ms_per_message'], 3)} (incl. Prefect server) |")
    lines.append("")
    pc, dc, seg = s.get("planning_ceiling"), s.get("dispatch_ceiling"), s.get("segments")
    plan, disp = s["stages"]["plan_render"].get("ours_cpu_ms_per_unit"), s["stages"]["dispatch"].get(
        "ours_cpu_ms_per_unit")
    if pc:
        lines.append(f"- Planning ceiling (bare compiled render + insert, {_f(pc.get('messages'))} messages): "
                     + (pc["error"] if pc.get("error") else
                        f"{_f(pc['cpu_ms_per_message'], 3)} ms CPU per message; planning + rendering "
                        f"{_f(plan, 3)} ms = {_f(plan / pc['cpu_ms_per_message'] if plan else None, 1)}x it."))
    if dc:
        lines.append("- Dispatch ceiling (raw aiohttp, the run's channel mix): "
                     + (dc["error"] if dc.get("error") else
                        f"{_f(dc['raw_cpu_ms_per_message'], 3)} ms CPU per message; our SDK transport alone "
                        f"{_f(dc['sdk_async_cpu_ms_per_message'], 3)} ms; our dispatcher side {_f(disp, 3)} ms = "
                        f"{_f(disp / dc['raw_cpu_ms_per_message'] if disp else None, 1)}x raw."))
    if seg:
        if seg.get("error"):
            lines.append(f"- Segments vs DuckDB: {seg['error']}")
        else:
            lines += ["- Segments and RFM on SQLite vs DuckDB (same data, best of 2): SQLite "
                      f"{seg['sqlite_total_s']} s in all, DuckDB {seg['duckdb_total_s']} s; counts agree: "
                      f"{'yes' if seg['all_counts_agree'] else 'NO'}.", "",
                      "| step | SQLite s | DuckDB s | ratio |", "|---|---:|---:|---:|"]
            lines += [f"| {st['step']} | {_f(st['sqlite_s'], 3)} | {_f(st['duckdb_s'], 3)} | {_f(st['ratio'], 1)} |"
                      for st in seg["steps"]]
    lines.append("")
    return lines


def write_report(out: Path, results: dict[str, Any]) -> dict[str, Path]:
    """results.md, scaling.svg and scaling.png in ``out`` (results.json is written by the caller)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if results.get("sizes"):
        svg, png = write_chart(out, results)
        paths["svg"] = svg
        if png:
            paths["png"] = png
    md = out / "results.md"
    md.write_text(markdown(results, "scaling.svg" if "svg" in paths else None), encoding="utf-8")
    paths["md"] = md
    return paths


def rebuild(results_json: Path) -> dict[str, Path]:
    """Rewrite results.md and the chart beside an existing results.json."""
    results = json.loads(results_json.read_text(encoding="utf-8"))
    return write_report(results_json.parent, results)


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs (e.g. 10k and 100k in one invocation, 1M in another).

    Sizes and baseline rows are taken from every part (a later part wins for the same size); each keeps its
    own load figures. The verdicts are recomputed; ``parts`` lists the commands and their times.
    """
    if not parts:
        raise ValueError("nothing to merge")
    sizes: dict[int, dict] = {}
    base: dict[int, dict] = {}
    for p in parts:
        sizes.update({s["members"]: s for s in p.get("sizes", [])})
        base.update({b["messages"]: b for b in p.get("baseline", [])})
    out = {**parts[0], "sizes": [sizes[k] for k in sorted(sizes)], "baseline": [base[k] for k in sorted(base)],
           "command": " ; ".join(p.get("command", "?") for p in parts),
           "started_at": min(p.get("started_at", "") for p in parts),
           "finished_at": max(p.get("finished_at", "") for p in parts),
           "load_before": parts[0].get("load_before"), "load_after": parts[-1].get("load_after"),
           "parts": [{k: p.get(k) for k in ("command", "started_at", "finished_at", "load_before", "load_after",
                                            "prefect_startup_s")} for p in parts]}
    out["ratios"] = ratios(out)
    out["targets"] = targets(out)
    out["scaling"] = scaling_verdict([
        (s["members"], s["campaign_flow"]["seconds"], s["peak_rss_mb"].get("harness") or 0.0) for s in out["sizes"]])
    return out


def merge_files(out: Path, inputs: Sequence[Path]) -> dict[str, Path]:
    """Merge results.json files (or folders holding one) into ``out``: results.json, results.md, the chart."""
    parts = [json.loads(((p / "results.json") if p.is_dir() else p).read_text(encoding="utf-8")) for p in inputs]
    merged = merge(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str), encoding="utf-8")
    return write_report(out, merged)
