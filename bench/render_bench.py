"""Rendering throughput per channel on one core.

Renders the ready-made campaigns for a rotating set of sample members (both locales, typical and
worst case) and reports renders per second for SMS, push and complete HTML emails (subject,
preheader, inlined HTML and text part, List-Unsubscribe headers). Templates are compiled once
before timing, exactly as a campaign run reuses them. Also measures the alternative the renderer
avoids: inlining CSS per message.

    .venv/bin/python bench/render_bench.py [--seconds 3] [--campaign birthday]

Targets: 20,000 SMS or push renders/s and 2,000 complete HTML emails/s on one core. Rates are per
CPU-second of the benchmark process (pinned to one core), so a busy machine does not skew them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from membercare.config import Settings
from membercare.links import LinkSigner
from membercare.models import Channel
from membercare.rendering import CampaignRenderer, TemplateStore
from membercare.rendering.htmltext import inline_rendered
from membercare.rendering.samples import SAMPLE_AS_OF, sample_context


def contexts(renderer: CampaignRenderer, n: int = 64) -> list[dict]:
    """``n`` distinct members (ids, names and links differ, so nothing is served from a cache by accident)."""
    out = []
    for i in range(n):
        locale = ("zh-TW", "en")[i % 2]
        ctx = sample_context(renderer.builder, locale, ("typical", "worst")[(i // 2) % 2])
        mid = 1_000 + i
        ctx["member"] = {**ctx["member"], "id": mid, "name": ctx["member"]["name"] + ("" if i < 4 else str(i))}
        ctx["unsubscribe_url"] = renderer.signer.unsubscribe_url(mid)
        ctx["email_unsubscribe_url"] = renderer.signer.unsubscribe_url(mid, "email")
        ctx["preferences_url"] = renderer.signer.preferences_url(mid)
        out.append(ctx)
    return out


def rate(fn, ctxs, seconds: float) -> tuple[float, int]:
    for c in ctxs[:8]:
        fn(c)  # warm caches (formatters, compiled templates)
    # CPU time of this process, not wall time: "renders per second on one core", and robust
    # against other processes competing for the machine while the benchmark runs.
    n, start, wall = 0, time.process_time(), time.perf_counter()
    deadline = start + seconds
    while time.process_time() < deadline:
        for c in ctxs:
            fn(c)
        n += len(ctxs)
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    if wall > 1.5 * cpu:
        print(f"  (machine busy: got {cpu / wall:.0%} of a core; wall-clock rate {n / wall:,.0f}/s)")
    return n / cpu, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--campaign", default="birthday", help="campaign with email, SMS and push (default birthday)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    settings = Settings()
    store = TemplateStore(settings.templates_dir, shop_locale=settings.shop_locale)
    r = CampaignRenderer(args.campaign, settings, signer=LinkSigner("bench-secret"), store=store)
    ctxs = contexts(r)

    t0 = time.perf_counter()
    for ch in r.campaign.channels:
        for c in ctxs[:4]:
            r.render(ch, c, as_of=SAMPLE_AS_OF, message_id="bench")
    print(f"campaign {r.campaign.name}: compile + first renders of every channel/locale "
          f"{1000 * (time.perf_counter() - t0):.0f} ms")

    targets = {Channel.SMS: 20_000, Channel.PUSH: 20_000, Channel.EMAIL: 2_000}
    results = {}
    for ch in (Channel.SMS, Channel.PUSH, Channel.EMAIL):
        if ch not in r.campaign.channels:
            continue
        per_s, n = rate(lambda c, ch=ch: r.render(ch, c, as_of=SAMPLE_AS_OF, message_id="0" * 36), ctxs, args.seconds)
        results[ch] = per_s
        ok = "meets" if per_s >= targets[ch] else "BELOW"
        print(f"{ch.value:6s} {per_s:10,.0f} renders/s  ({n:,} renders; target {targets[ch]:,}/s: {ok})")

    if Channel.EMAIL in r.campaign.channels:
        # What per-message inlining would cost on top of rendering (the design renders pre-inlined templates).
        html = r.render(Channel.EMAIL, ctxs[0], as_of=SAMPLE_AS_OF).html
        per_s, _ = rate(lambda c: inline_rendered(html), ctxs, min(args.seconds, 2.0))
        print(f"(per-message CSS inlining alone would run at {per_s:,.0f}/s, i.e. about "
              f"{1e6 / per_s:,.0f} µs per email; done once per template instead)")
        size = len(html.encode())
        print(f"email HTML size: {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
