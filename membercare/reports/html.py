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

from membercare.reports.core import FunnelRow, Report

STAGES = ("planned", "sent", "delivered", "opened", "clicked", "converted")
CHANNEL_COLOURS = {"email": "#4C78A8", "sms": "#F58518", "push": "#54A24B", "-": "#BAB0AC"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans TC","PingFang TC","Microsoft JhengHei",sans-serif;
margin:0;background:#f6f7f9;color:#1f2933}
header{background:#1f2933;color:#fff;padding:20px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#cbd2d9;font-size:13px}main{padding:20px 32px;max-width:1280px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;margin-bottom:20px}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .v{font-size:24px;font-weight:600}.card .l{font-size:12px;color:#616e7c;text-transform:uppercase;
letter-spacing:.04em}.card .s{font-size:12px;color:#7b8794}
section{background:#fff;border-radius:8px;padding:16px 18px;margin-bottom:18px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
section h2{font-size:16px;margin:0 0 4px}section p.note{font-size:12px;color:#616e7c;margin:0 0 10px}
.charts{display:flex;flex-wrap:wrap;gap:18px}.chart svg{max-width:100%;height:auto}
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

    data = [{"campaign": r.campaign, "channel": r.channel, "stage": s, "order": i, "messages": getattr(r, s)}
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

    data = [{"campaign": r.campaign, "channel": r.channel, "revenue": r.revenue_minor / 100,
             "conversion_rate": (r.converted / r.sent) if r.sent else 0.0}
            for r in rows if r.sent or r.revenue_minor]
    channels = sorted({d["channel"] for d in data}) or ["email"]
    colour = alt.Color("channel:N", scale=alt.Scale(domain=channels,
                                                    range=[CHANNEL_COLOURS.get(c, "#888") for c in channels]))
    revenue = alt.Chart(alt.Data(values=data)).mark_bar().encode(
        y=alt.Y("campaign:N", title=None, sort="-x"), x=alt.X("sum(revenue):Q", title=f"attributed revenue ({currency})"),
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
    bars = base.mark_bar().encode(y=alt.Y("campaign:N", title=None), yOffset="arm:N",
                                  x=alt.X("rate:Q", title="conversion rate (95 % interval)", axis=alt.Axis(format="%")),
                                  color=colour, tooltip=["campaign:N", "arm:N", alt.Tooltip("rate:Q", format=".2%")])
    errs = base.mark_errorbar(color="#1f2933").encode(
        y=alt.Y("campaign:N"), yOffset="arm:N", x=alt.X("lo:Q", title="conversion rate (95 % interval)"), x2="hi:Q")
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
        cells = [r.campaign, r.segment or "–", r.channel, f"{r.planned:,}", f"{r.sent:,}", f"{r.delivered:,}",
                 f"{r.opened:,}", f"{r.clicked:,}", f"{r.converted:,}", _pct(r.rate("converted"), 2),
                 _money(r.revenue_minor, cur), f"{r.coupons:,}", f"{r.unsubscribed:,}", f"{r.sms_segments:,}",
                 _money(r.sms_cost_minor, cur) if r.sms_segments else "–"]
        style = " style='font-weight:600'" if r is report.totals else ""
        out.append(f"<tr{style}>" + "".join(f"<td class='{'t' if i < 3 else ''}'>{_e(c)}</td>"
                                            for i, c in enumerate(cells)) + "</tr>")
    return "".join(out) + "</table>"


def _holdout_table(report: Report) -> str:
    cur = report.options.currency
    head = ("campaign", "treated", "conv.", "holdout", "conv.", "lift (points)", "95 % interval", "relative",
            "revenue / member lift", "verdict")
    out = ["<table><tr>" + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
           + "</tr>"]
    for h in report.holdouts:
        c = h.conversion
        if c is None:
            verdict, lift, ci, rel = "<span class='muted'>an arm is empty</span>", "–", "–", "–"
        else:
            lift = f"{100 * c.absolute_lift:+.2f}"
            ci = f"{100 * c.absolute_lift_ci[0]:+.2f} … {100 * c.absolute_lift_ci[1]:+.2f}"
            rel = _pct(c.relative_lift) if c.relative_lift is not None else "–"
            if c.significant:
                verdict = ("<span class='good'>works</span>" if c.absolute_lift > 0
                           else "<span class='bad'>hurts</span>")
            else:
                verdict = "<span class='muted'>not shown yet</span>"
        rev = "–" if h.revenue is None else (
            f"{_money(h.revenue.absolute_lift, cur)} ({_money(h.revenue.absolute_lift_ci[0], cur)} … "
            f"{_money(h.revenue.absolute_lift_ci[1], cur)})")
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
         f"{k.expected_lifetime_years:.1f} years{' (assumed: too few buyers a year ago)' if k.lifetime_assumed else ''}"),
        ("Estimated customer lifetime value (AOV x frequency x lifetime)", _money(k.clv_minor, cur)),
        ("Orders / revenue in the period", f"{k.period_orders:,} / {_money(k.period_revenue_minor, cur)}"),
    ]
    if k.bgnbd:
        b = k.bgnbd
        rows.append((f"BG/NBD expected purchases per buyer, next {b['horizon_days']} days (scored {b['as_of_date']})",
                     f"{b['mean_expected_purchases']:.2f} (≈ {_money(b['expected_revenue_per_buyer_minor'], cur)}); "
                     f"mean P(alive) {b['mean_p_alive']:.2f}"))
    return "<table>" + "".join(f"<tr><td class='t'>{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b in rows) + "</table>"


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
        parts.append("<section><h2>Campaigns</h2><p class='note'>No messages were planned in this period.</p></section>")
    holdout = _holdout_chart(report)
    if report.holdouts:
        parts.append("<section><h2>Did it work? Treated vs holdout</h2><p class='note'>Members held out of a "
                     "campaign are compared with everyone else it selected (intent to treat): a purchase within the "
                     "attribution window after the planned send. The lift is significant when its 95 % interval "
                     "excludes zero.</p>")
        if holdout is not None:
            parts.append(f"<div class='chart'>{_svg(holdout)}</div>")
        parts.append(_holdout_table(report) + "</section>")
    parts.append(f"<section><h2>Trends</h2><div class='charts'><div class='chart'>{_svg(_trend_chart(report))}</div>"
                 "</div></section>")
    parts.append(f"<section><h2>Members and shop KPIs</h2><div class='charts'><div class='chart'>"
                 f"{_svg(_tier_chart(report))}</div><div style='flex:1;min-width:420px'>{_kpi_table(report)}</div>"
                 "</div></section>")
    parts.append(f"<section><h2>Funnel details</h2>{_funnel_table(report)}</section>")
    parts.append("</main></body></html>")
    return "".join(parts)


def write_html(report: Report, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
