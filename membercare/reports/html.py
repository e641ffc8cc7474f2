"""The report as one self-contained HTML file: headline cards, charts and the detailed tables.

Charts are Vega-Lite specifications built with Altair and rendered to SVG on our side by ``vl-convert``
(which embeds the Vega engine; no network, no browser). The SVG is inlined, so the file opens offline,
in any browser or mail client that shows HTML, with no JavaScript at all, and prints well.

What a marketer should see at a glance, top to bottom: the headline numbers; which campaign converts
and earns (funnel and revenue by campaign and channel); whether campaigns beat their holdout (lift with
95 % intervals: an interval that crosses zero is "not shown to work yet"); how things move over time;
the member base by tier. Tables below the charts carry every figure.
"""

from __future__ import annotations

import html
from pathlib import Path

from membercare.reports import FrequencySection, FunnelRow, Report
from membercare.reports.funnel import NO_CHANNEL, NO_CHANNEL_NOTE, channel_label
from membercare.reports.html_checks import (
    LABELS,
    amount,
    holdout_checks,
    interval,
    programme_checks,
    variant_evidence,
    verdict_html,
)

STAGES = ("planned", "sent", "delivered", "opened", "clicked", "converted")
CHANNEL_COLOURS = {"email": "#4C78A8", "sms": "#F58518", "push": "#54A24B", "line": "#06C755", "none": "#BAB0AC"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans TC","PingFang TC","Microsoft JhengHei",sans-serif;
margin:0;background:#f6f7f9;color:#1f2933}
header{background:#1f2933;color:#fff;padding:20px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#cbd2d9;font-size:13px}main{padding:20px 32px;max-width:1280px;box-sizing:border-box}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;margin-bottom:20px}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .v{font-size:24px;font-weight:600}.card .l{font-size:12px;color:#616e7c;text-transform:uppercase;
letter-spacing:.04em}.card .s{font-size:12px;color:#7b8794}
section{background:#fff;border-radius:8px;padding:16px 18px;margin-bottom:18px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
section h2{font-size:16px;margin:0 0 4px}section h3{font-size:14px;margin:12px 0 2px}
section p.note{font-size:12px;color:#616e7c;margin:0 0 10px}
.charts{display:flex;flex-wrap:wrap;gap:18px}.chart{max-width:100%;overflow-x:auto}
.chart svg{max-width:100%;height:auto}
.scroll{max-width:100%;overflow-x:auto}.charts>div{max-width:100%}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{padding:5px 8px;text-align:right;
border-bottom:1px solid #e4e7eb}th{background:#f5f7fa;font-weight:600}td.t,th.t{text-align:left}
.good{color:#1b7f3b;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#7b8794}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _money(minor: float | None, currency: str) -> str:
    if minor is None:
        return "–"
    return f"{currency} {minor / 100:,.0f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _svg(chart) -> str:
    import vl_convert as vlc

    return vlc.vegalite_to_svg(chart.to_dict())


def _funnel_chart(rows: list[FunnelRow]):
    import altair as alt

    data = [{"campaign": r.campaign, "channel": channel_label(r.channel), "stage": s, "order": i,
             "messages": getattr(r, s)}
            for r in rows if r.planned for i, s in enumerate(STAGES)]
    channels = sorted({d["channel"] for d in data})
    return alt.Chart(alt.Data(values=data)).mark_bar().encode(
        x=alt.X("stage:N", sort=list(STAGES), title=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("sum(messages):Q", title="messages"),
        color=alt.Color("channel:N", scale=alt.Scale(domain=channels,
                                                      range=[CHANNEL_COLOURS.get(c, "#888") for c in channels])),
        xOffset="channel:N",
        tooltip=["campaign:N", "channel:N", "stage:N", "sum(messages):Q"],
    ).properties(width=260, height=170).facet(
        facet=alt.Facet("campaign:N", title=None), columns=3,
    ).properties(title="Funnel by campaign and channel")


def _revenue_chart(rows: list[FunnelRow], currency: str):
    import altair as alt

    data = [{"campaign": r.campaign, "channel": channel_label(r.channel), "revenue": r.revenue_minor / 100,
             "conversion_rate": (r.converted / r.sent) if r.sent else 0.0}
            for r in rows if r.sent or r.revenue_minor]
    channels = sorted({channel_label(r.channel) for r in rows if r.sent or r.revenue_minor}) or ["email"]
    colour = alt.Color("channel:N", scale=alt.Scale(domain=channels,
                                                    range=[CHANNEL_COLOURS.get(c, "#888") for c in channels]))
    revenue = alt.Chart(alt.Data(values=data)).mark_bar().encode(
        y=alt.Y("campaign:N", title=None, sort="-x"),
        x=alt.X("sum(revenue):Q", title=f"attributed revenue ({currency})"),
        color=colour, tooltip=["campaign:N", "channel:N", alt.Tooltip("sum(revenue):Q", format=",.0f")],
    ).properties(width=380, height=max(60, 26 * len({d["campaign"] for d in data})),
                 title="Attributed revenue")
    rate = alt.Chart(alt.Data(values=data)).mark_bar().encode(
        y=alt.Y("campaign:N", title=None), yOffset="channel:N",
        x=alt.X("conversion_rate:Q", title="conversions per sent message", axis=alt.Axis(format="%")),
        color=colour, tooltip=["campaign:N", "channel:N", alt.Tooltip("conversion_rate:Q", format=".1%")],
    ).properties(width=300, height=max(60, 26 * len({d["campaign"] for d in data})), title="Conversion rate")
    return alt.hconcat(revenue, rate)


def _trend_chart(report: Report):
    import altair as alt

    o = report.options
    rows = []
    for p in report.trends:
        for name in ("sent", "opened", "clicked", "conversions", "unsubscribed"):
            rows.append({"bucket": p.bucket.isoformat(), "metric": name, "value": getattr(p, name)})
    revenue = [{"bucket": p.bucket.isoformat(), "revenue": p.revenue_minor / 100} for p in report.trends]
    unit = "yearmonthdate"
    lines = alt.Chart(alt.Data(values=rows)).mark_line(point=True).encode(
        x=alt.X(f"{unit}(bucket):T", title=None), y=alt.Y("value:Q", title="count"),
        color=alt.Color("metric:N", sort=["sent", "opened", "clicked", "conversions", "unsubscribed"]),
        tooltip=["bucket:T", "metric:N", "value:Q"],
    ).properties(width=560, height=220, title=f"Activity per {o.granularity} ({o.timezone})")
    bars = alt.Chart(alt.Data(values=revenue)).mark_bar(color="#72B7B2").encode(
        x=alt.X(f"{unit}(bucket):T", title=None), y=alt.Y("revenue:Q", title=f"revenue ({o.currency})"),
        tooltip=["bucket:T", alt.Tooltip("revenue:Q", format=",.0f")],
    ).properties(width=420, height=220, title=f"Attributed revenue per {o.granularity}")
    return alt.hconcat(lines, bars)


def _holdout_chart(report: Report):
    import altair as alt

    data = []
    for h in report.holdouts:
        if h.conversion is None:
            continue
        c = h.conversion
        data.append({"campaign": h.campaign, "arm": "treated", "rate": c.treated_rate,
                     "lo": c.treated_rate_ci[0], "hi": c.treated_rate_ci[1]})
        data.append({"campaign": h.campaign, "arm": "holdout", "rate": c.control_rate,
                     "lo": c.control_rate_ci[0], "hi": c.control_rate_ci[1]})
    if not data:
        return None
    base = alt.Chart(alt.Data(values=data))
    colour = alt.Color("arm:N", scale=alt.Scale(domain=["treated", "holdout"], range=["#4C78A8", "#BAB0AC"]))
    title = "conversion rate (95 % Wilson, rows as independent)"
    bars = base.mark_bar().encode(y=alt.Y("campaign:N", title=None), yOffset="arm:N",
                                  x=alt.X("rate:Q", title=title, axis=alt.Axis(format="%")),
                                  color=colour, tooltip=["campaign:N", "arm:N", alt.Tooltip("rate:Q", format=".2%")])
    errs = base.mark_errorbar(color="#1f2933").encode(
        y=alt.Y("campaign:N"), yOffset="arm:N", x=alt.X("lo:Q", title=title), x2="hi:Q")
    return (bars + errs).properties(width=520, height=max(70, 44 * len({d["campaign"] for d in data})),
                                    title="Treated vs holdout")


def _tier_chart(report: Report):
    import altair as alt

    tiers = list(report.kpis.members_by_tier.items())
    data = [{"tier": t, "members": n} for t, n in tiers]
    return alt.Chart(alt.Data(values=data)).mark_bar(color="#B279A2").encode(
        x=alt.X("tier:N", sort=[t for t, _ in tiers], title=None), y=alt.Y("members:Q"),
        tooltip=["tier:N", "members:Q"],
    ).properties(width=240, height=180, title="Members by tier")


def _cards(report: Report) -> str:
    k, t, cur = report.kpis, report.totals, report.options.currency
    cards = [
        ("Messages sent", f"{t.sent:,}", f"{t.planned:,} planned"),
        ("Open rate", _pct(t.rate("opened")), f"{t.opened:,} opened"),
        ("Click rate", _pct(t.rate("clicked")), f"{t.clicked:,} clicked"),
        ("Conversions", f"{t.converted:,}", f"{_pct(t.rate('converted'), 2)} of sent"),
        ("Attributed revenue", _money(t.revenue_minor, cur), f"{t.orders:,} orders"),
        ("Unsubscribes", f"{t.unsubscribed:,}", f"{_pct(t.rate('unsubscribed'), 2)} of sent"),
        ("Active members", f"{k.active_members:,}", f"of {k.members_total:,} (bought in {k.window_days} d)"),
        ("Repurchase rate", _pct(k.repurchase_rate), "buyers with 2+ orders"),
        ("Average order", _money(k.aov_minor, cur), f"{k.orders:,} orders in {k.window_days} d"),
        ("Est. lifetime value", _money(k.clv_minor, cur),
         f"{k.expected_lifetime_years:.1f} y lifetime{' (assumed)' if k.lifetime_assumed else ''}"
         if k.expected_lifetime_years is not None else ""),
    ]
    if t.sms_segments:
        cards.append(("SMS cost", _money(t.sms_cost_minor, cur), f"{t.sms_segments:,} segments"))
    return "<div class='cards'>" + "".join(
        f"<div class='card'><div class='l'>{_e(label)}</div><div class='v'>{_e(value)}</div>"
        f"<div class='s'>{_e(sub)}</div></div>" for label, value, sub in cards) + "</div>"


def _funnel_table(report: Report) -> str:
    cur = report.options.currency
    head = ("campaign", "segment", "channel", "planned", "sent", "delivered", "opened", "clicked", "converted",
            "conv. rate", "revenue", "coupons", "unsub.", "SMS segm.", "SMS cost")
    out = ["<table><tr>" + "".join(f"<th class='{'t' if i < 3 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
           + "</tr>"]
    for r in [*report.funnel, report.totals]:
        cells = [r.campaign, r.segment or "–", channel_label(r.channel), f"{r.planned:,}", f"{r.sent:,}",
                 f"{r.delivered:,}", f"{r.opened:,}", f"{r.clicked:,}", f"{r.converted:,}",
                 _pct(r.rate("converted"), 2),
                 _money(r.revenue_minor, cur), f"{r.coupons:,}", f"{r.unsubscribed:,}", f"{r.sms_segments:,}",
                 _money(r.sms_cost_minor, cur) if r.sms_segments else "–"]
        style = " style='font-weight:600'" if r is report.totals else ""
        out.append(f"<tr{style}>" + "".join(f"<td class='{'t' if i < 3 else ''}'>{_e(c)}</td>"
                                            for i, c in enumerate(cells)) + "</tr>")
    note = (f"<p class='note'>{_e(NO_CHANNEL_NOTE)}</p>" if any(r.channel == NO_CHANNEL for r in report.funnel)
            else "")
    return "".join(out) + "</table>" + note


def _holdout_table(report: Report) -> str:
    cur = report.options.currency
    head = ("campaign", "treated", "conv.", "holdout", "conv.", "lift (points)", "member-clustered interval",
            "relative", "revenue / member lift", "verdict")
    out = ["<table><tr>" + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
           + "</tr>"]
    for h in report.holdouts:
        c = h.conversion
        conv = h.checks.metric("conversion") if h.checks else None
        money = h.checks.metric("revenue") if h.checks else None
        lift = f"{100 * c.absolute_lift:+.2f}" if c else "–"
        ci = interval("conversion", conv.interval, cur) if conv else "–"
        rel = _pct(c.relative_lift) if c and c.relative_lift is not None else "–"
        verdict = verdict_html(h.checks)
        rev = "–" if money is None else (
            f"{amount('revenue', money.difference, cur)} ({interval('revenue', money.interval, cur)})")
        cells = [_e(h.campaign), f"{h.treated_n:,}", _e(_pct(c.treated_rate, 2) if c else "–"), f"{h.holdout_n:,}",
                 _e(_pct(c.control_rate, 2) if c else "–"), _e(lift), _e(ci), _e(rel), _e(rev), verdict]
        out.append("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{v}</td>"
                                    for i, v in enumerate(cells)) + "</tr>")
    return "".join(out) + "</table>"


def _kpi_table(report: Report) -> str:
    k, cur = report.kpis, report.options.currency
    rows = [
        ("Members", f"{k.members_total:,} ({k.new_members:,} joined in the period)"),
        ("Members by tier", ", ".join(f"{t}: {n:,}" for t, n in k.members_by_tier.items()) or "–"),
        (f"Active members (a purchase in the last {k.window_days} days)", f"{k.active_members:,}"),
        ("Repurchase rate (buyers with 2+ purchases / buyers)", _pct(k.repurchase_rate)),
        ("Average order value", _money(k.aov_minor, cur)),
        ("Purchases per buyer per year", "–" if k.purchases_per_buyer_per_year is None
         else f"{k.purchases_per_buyer_per_year:.2f}"),
        ("Year-over-year buyer retention", _pct(k.retention_rate)),
        ("Expected lifetime", "–" if k.expected_lifetime_years is None else
         f"{k.expected_lifetime_years:.1f} years"
         f"{' (assumed: too few buyers a year ago)' if k.lifetime_assumed else ''}"),
        ("Estimated customer lifetime value (AOV x frequency x lifetime)", _money(k.clv_minor, cur)),
        ("Orders / revenue in the period", f"{k.period_orders:,} / {_money(k.period_revenue_minor, cur)}"),
    ]
    if k.bgnbd:
        b = k.bgnbd
        rows.append((f"BG/NBD expected purchases per buyer, next {b['horizon_days']} days (scored {b['as_of_date']})",
                     f"{b['mean_expected_purchases']:.2f} (≈ {_money(b['expected_revenue_per_buyer_minor'], cur)}); "
                     f"mean P(alive) {b['mean_p_alive']:.2f}"))
    return "<table>" + "".join(f"<tr><td class='t'>{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b in rows) + "</table>"


def _lift_chart(report: Report):
    """Absolute lift (percentage points) of visit and conversion rate per campaign, with 95 % intervals."""
    import altair as alt

    data = []
    for h in report.holdouts:
        for m in (h.checks.metrics if h.checks else []):
            if m.metric == "revenue":
                continue
            data.append({"campaign": h.campaign, "metric": LABELS[m.metric], "lift": 100 * m.difference,
                         "lo": 100 * m.interval[0], "hi": 100 * m.interval[1]})
    if not data:
        return None
    base = alt.Chart(alt.Data(values=data))
    colour = alt.Color("metric:N", scale=alt.Scale(domain=["visit rate", "conversion rate"],
                                                   range=["#72B7B2", "#4C78A8"]))
    title = "lift vs holdout, percentage points (member-clustered 95 % interval)"
    x = alt.X("lift:Q", title=title)
    points = base.mark_point(filled=True, size=70).encode(
        y=alt.Y("campaign:N", title=None), yOffset="metric:N", x=x, color=colour,
        tooltip=["campaign:N", "metric:N", alt.Tooltip("lift:Q", format="+.2f"), alt.Tooltip("lo:Q", format="+.2f"),
                 alt.Tooltip("hi:Q", format="+.2f")])
    errs = base.mark_errorbar(ticks=True).encode(y=alt.Y("campaign:N"), yOffset="metric:N",
                                                 x=alt.X("lo:Q", title=title), x2="hi:Q", color=colour)
    zero = alt.Chart(alt.Data(values=[{"x": 0}])).mark_rule(color="#7b8794", strokeDash=[4, 3]).encode(x="x:Q")
    return (errs + points + zero).properties(
        width=520, height=max(70, 50 * len({d["campaign"] for d in data})), title="Lift with 95 % intervals")


def _visit_table(report: Report) -> str:
    head = ("campaign", "treated visited", "holdout visited", "visit lift (points)", "member-clustered interval",
            "relative", "significant (Holm-adjusted if secondary)")
    out = ["<table><tr>" + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
           + "</tr>"]
    for h in report.holdouts:
        v = h.visit
        check = h.checks.metric("visit") if h.checks else None
        lift = f"{100 * v.absolute_lift:+.2f}" if v else "–"
        cells = [h.campaign, f"{h.treated_visitors:,} ({_pct(v.treated_rate, 2) if v else '–'})",
                 f"{h.holdout_visitors:,} ({_pct(v.control_rate, 2) if v else '–'})", lift,
                 interval("visit", check.interval, report.options.currency) if check else "–",
                 _pct(v.relative_lift) if v and v.relative_lift is not None else "–",
                 ("yes" if check.significant else "no") if check else "–"]
        out.append("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{_e(c)}</td>" for i, c in enumerate(cells))
                   + "</tr>")
    return "".join(out) + "</table>"


def _programme_section(report: Report) -> str:
    p, cur = report.programme, report.options.currency
    if p is None:
        return ""
    c, r = p.conversion, p.revenue
    rows = [
        ("members", f"{p.treated_n:,}", f"{p.control_n:,}"),
        ("conversion rate", _pct(c.treated_rate, 2) if c else "–", _pct(c.control_rate, 2) if c else "–"),
        ("revenue per member", _money(r.treated.mean, cur) if r else "–", _money(r.control.mean, cur) if r else "–"),
    ]
    head = ("", "marketed", "global control")
    table = ("<table><tr>" + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
             + "</tr>" + "".join("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{_e(v)}</td>"
                                                  for i, v in enumerate(row)) + "</tr>" for row in rows) + "</table>"
             + programme_checks(p.checks, cur))
    return ("<section><h2>Does the programme work? Marketed members vs the global control group</h2>"
            "<p class='note'>Members in the global control group get no marketing at all. Everyone a marketing "
            "campaign selected in the period is compared with them: purchases from the member's first planned "
            "message to the end of the period.</p>" + table + "</section>")


def _variant_chart(section):
    import altair as alt

    data = [{"variant": v.name, "mean": v.posterior_mean, "lo": v.credible_interval[0],
             "hi": v.credible_interval[1], "p_best": v.p_best} for v in section.variants]
    base = alt.Chart(alt.Data(values=data))
    title = f"{section.goal} rate: posterior mean and 95 % credible interval"
    x = alt.X("mean:Q", title=title, axis=alt.Axis(format="%"))
    points = base.mark_point(filled=True, size=70, color="#4C78A8").encode(
        y=alt.Y("variant:N", title=None, sort=[v.name for v in section.variants]), x=x,
        tooltip=["variant:N", alt.Tooltip("mean:Q", format=".2%"), alt.Tooltip("p_best:Q", format=".3f")])
    errs = base.mark_errorbar(ticks=True, color="#4C78A8").encode(
        y=alt.Y("variant:N", sort=[v.name for v in section.variants]), x=alt.X("lo:Q", title=title), x2="hi:Q")
    return (errs + points).properties(width=420, height=max(60, 30 * len(data)), title=section.campaign)


def _variant_section(report: Report) -> str:
    if not report.variants:
        return ""
    parts = ["<section><h2>Variant tests</h2><p class='note'>Each variant's goal rate has a Beta posterior "
             "(uniform prior); P(best) is the probability that it has the highest rate. The next run's shares "
             "follow P(best) with an exploration floor until a variant passes the run-stratified promotion test below."
             "</p>"]
    head = ("variant", "sends", "clicks", "conversions", "posterior Beta(a, b)", "mean", "95 % credible",
            "P(best)", "latest share", "next share")
    for v in report.variants:
        status = (f"<span class='good'>winner: {_e(v.winner)}</span>" if v.winner
                  else "<span class='muted'>no winner yet</span>")
        if v.promoted:
            status += f" · planning promoted {_e(v.promoted)}"
        if v.plan_reason:
            status += f" · latest shares: {_e(v.plan_reason)}"
        parts.append(f"<h3>{_e(v.campaign)}</h3><p class='note'>goal {_e(v.goal)} · floor {v.floor:.0%} · promote "
                     f"at P(best) ≥ {v.promote_at:.0%} · latest run {_e(v.latest_occurrence or '–')} · {status}"
                     + "".join(f" · {_e(n)}" for n in v.notes) + "</p>")
        parts.append(f"<div class='charts'><div class='chart'>{_svg(_variant_chart(v))}</div>"
                     "<div style='flex:1;min-width:520px'><table><tr>"
                     + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
                     + "</tr>")
        for row in v.variants:
            share = row.planned_share if row.planned_share is not None else row.latest_share
            cells = [row.name, f"{row.sends:,}", f"{row.clicks:,}", f"{row.conversions:,}",
                     f"({row.posterior_alpha:g}, {row.posterior_beta:g})", _pct(row.posterior_mean, 2),
                     f"{_pct(row.credible_interval[0], 2)} … {_pct(row.credible_interval[1], 2)}",
                     f"{row.p_best:.3f}", _pct(share), _pct(row.next_share)]
            parts.append("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{_e(c)}</td>"
                                          for i, c in enumerate(cells)) + "</tr>")
        parts.append("</table></div></div>" + variant_evidence(v))
    return "".join(parts) + "</section>"


def _frequency_chart(f: FrequencySection):
    import altair as alt

    data = []
    for b in f.buckets:
        if not b.member_weeks:
            continue
        data.append({"messages": b.label, "metric": "unsubscribe", "rate": b.unsubscribe_rate,
                     "lo": b.unsubscribe_rate_ci[0], "hi": b.unsubscribe_rate_ci[1]})
        data.append({"messages": b.label, "metric": "complaint", "rate": b.complaint_rate,
                     "lo": b.complaint_rate_ci[0], "hi": b.complaint_rate_ci[1]})
    order = [b.label for b in f.buckets]
    base = alt.Chart(alt.Data(values=data))
    colour = alt.Color("metric:N", scale=alt.Scale(domain=["unsubscribe", "complaint"], range=["#F58518", "#B42318"]))
    title = "rate per member-week (95 % interval)"
    y = alt.Y("rate:Q", title=title, axis=alt.Axis(format="%"))
    points = base.mark_point(filled=True, size=60).encode(
        x=alt.X("messages:N", sort=order, title="marketing messages received that week", axis=alt.Axis(labelAngle=0)),
        xOffset="metric:N", y=y,
        color=colour, tooltip=["messages:N", "metric:N", alt.Tooltip("rate:Q", format=".3%")])
    errs = base.mark_errorbar().encode(x=alt.X("messages:N", sort=order), xOffset="metric:N",
                                                 y=alt.Y("lo:Q", title=title), y2="hi:Q", color=colour)
    ceiling = alt.Chart(alt.Data(values=[{"y": f.max_unsubscribe_rate}])).mark_rule(
        color="#F58518", strokeDash=[4, 3]).encode(y="y:Q")
    return (errs + points + ceiling).properties(width=460, height=220, title="Opt-outs by weekly frequency")


def _frequency_section(report: Report) -> str:
    f = report.frequency
    if f is None or not f.member_weeks:
        return ""
    head = ("messages / week", "member-weeks", "unsubscribe rate", "95 % interval", "complaint rate",
            "95 % interval", "unsub. / 1,000 msgs", "complaints / 1,000 msgs")
    rows = []
    for b in f.buckets:
        if not b.member_weeks:
            continue
        cells = [b.label, f"{b.member_weeks:,}", _pct(b.unsubscribe_rate, 3),
                 f"{_pct(b.unsubscribe_rate_ci[0], 3)} … {_pct(b.unsubscribe_rate_ci[1], 3)}",
                 _pct(b.complaint_rate, 3), f"{_pct(b.complaint_rate_ci[0], 3)} … {_pct(b.complaint_rate_ci[1], 3)}",
                 f"{b.unsubscribes_per_1000_messages:.2f}", f"{b.complaints_per_1000_messages:.2f}"]
        rows.append("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{_e(c)}</td>" for i, c in enumerate(cells))
                    + "</tr>")
    complaint = "" if f.max_complaint_rate is None else f" and complaints at most {_pct(f.max_complaint_rate, 2)}"
    safe = (f"none: {f.why_none_safe()}" if f.highest_safe is None
            else f"{f.highest_safe} message{'s' if f.highest_safe != 1 else ''} per week")
    return ("<section><h2>How often? Opt-outs by weekly frequency</h2><p class='note'>Each member-week with at "
            "least one marketing message sent, by how many the member received that week, with the share of those "
            "weeks in which the member unsubscribed (or replied STOP) or complained. Observational: members who get "
            "more messages may differ. The cap is read conservatively from the upper 95 % bounds.</p>"
            f"<p><b>Highest safe weekly frequency</b> (unsubscribes at most {_pct(f.max_unsubscribe_rate, 2)}"
            f"{complaint} per member-week, buckets of at least {f.min_member_weeks} member-weeks): {_e(safe)}</p>"
            f"<div class='charts'><div class='chart'>{_svg(_frequency_chart(f))}</div>"
            "<div style='flex:1;min-width:520px'><table><tr>"
            + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head)) + "</tr>"
            + "".join(rows) + "</table></div></div></section>")


def render_html(report: Report) -> str:
    o = report.options
    a = o.attribution
    touch = ", ".join(f"{ch}: {lv.value}" for ch, lv in sorted(a.touch.items()))
    title = f"Campaign report{' · ' + o.campaign if o.campaign else ''}"
    sub = (f"{o.since:%Y-%m-%d %H:%M} – {o.until:%Y-%m-%d %H:%M} UTC · attribution: {a.model.value.replace('_', ' ')},"
           f" {a.window.days if a.window.days * 86400 == a.window_seconds else a.window_seconds / 86400:g}-day window "
           f"after {touch} · generated {report.generated_at:%Y-%m-%d %H:%M} UTC")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>",
             f"<header><h1>{_e(title)}</h1><p>{_e(sub)}</p></header><main>", _cards(report)]
    if report.funnel:
        parts.append("<section><h2>Campaigns</h2><p class='note'>Messages per stage; a click implies an open and "
                     "an open a delivery. Conversions are orders credited to a message by the attribution model."
                     "</p><div class='charts'>")
        parts.append(f"<div class='chart'>{_svg(_funnel_chart(report.funnel))}</div>")
        parts.append(f"<div class='chart'>{_svg(_revenue_chart(report.funnel, o.currency))}</div></div></section>")
    else:
        parts.append("<section><h2>Campaigns</h2>"
                     "<p class='note'>No messages were planned in this period.</p></section>")
    holdout = _holdout_chart(report)
    if report.holdouts:
        parts.append("<section><h2>Did it work? Treated vs holdout</h2><p class='note'>Members held out of a "
                     "campaign are compared with everyone else it selected (intent to treat): a purchase within the "
                     "attribution window after the planned send. Intervals are member-clustered; the verdict rests "
                     "on the campaign's primary metric (decision checks below).</p>")
        lift = _lift_chart(report)
        charts = [c for c in (holdout, lift) if c is not None]
        if charts:
            parts.append("<div class='charts'>" + "".join(f"<div class='chart'>{_svg(c)}</div>" for c in charts)
                         + "</div>")
        parts.append(_holdout_table(report) + "<p class='note'>Visits: the member clicked a link (of any message, "
                     "or a site visit recorded without one) or tapped a push within the window.</p>"
                     + _visit_table(report) + holdout_checks(report.holdouts, o.currency) + "</section>")
    parts.append(_programme_section(report))
    parts.append(_variant_section(report))
    parts.append(_frequency_section(report))
    parts.append(f"<section><h2>Trends</h2><div class='charts'><div class='chart'>{_svg(_trend_chart(report))}</div>"
                 "</div></section>")
    parts.append(f"<section><h2>Members and shop KPIs</h2><div class='charts'><div class='chart'>"
                 f"{_svg(_tier_chart(report))}</div><div style='flex:1;min-width:420px'>{_kpi_table(report)}</div>"
                 "</div></section>")
    parts.append(f"<section><h2>Funnel details</h2>{_funnel_table(report)}</section>")
    parts.append("</main></body></html>")
    # Every table scrolls inside its section, so a wide one never widens the page past 1280 px.
    return "".join(parts).replace("<table", "<div class='scroll'><table").replace("</table>", "</table></div>")


def write_html(report: Report, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
