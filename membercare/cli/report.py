"""``membercare report``: campaign funnel, holdout lift, shop KPIs and trends, in the terminal or as HTML."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, err_console, migrated_engine, state
from membercare.errors import InputError


def _shop_sms_price(settings) -> int:
    """``sms.price_per_segment_minor`` of ``templates/_layout/shop.yaml`` (0 when absent)."""
    import yaml

    path = Path(settings.templates_dir) / "_layout" / "shop.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return 0
    except (OSError, yaml.YAMLError) as exc:
        err_console.print(f"[yellow]warning:[/] {path} unreadable ({type(exc).__name__}): SMS cost shown as 0")
        return 0
    return int((data.get("sms") or {}).get("price_per_segment_minor") or 0)


def _campaigns(settings) -> list:
    from membercare.campaigns import list_campaigns

    try:
        return list_campaigns(settings)
    except Exception as exc:  # noqa: BLE001 - a broken definition must not stop a report
        # Campaign definitions hold no personal data, so their error text is safe to show.
        err_console.print(f"[yellow]warning:[/] campaign definitions not read ({type(exc).__name__}: {exc}); "
                          "segment and variant columns stay empty")
        return []


def _segments(campaigns) -> dict[str, str]:
    """Campaign name -> segment name (or ``trigger:<event>``) from the campaign definitions."""
    out = {}
    for c in campaigns:
        if c.segment is not None:
            out[c.name] = c.segment.name
        elif c.trigger is not None:
            out[c.name] = f"trigger:{c.trigger.event}"
    return out


@app.command("report")
def report(
    campaign: str | None = typer.Option(None, "--campaign", help="Only this campaign."),
    since: str | None = typer.Option(None, "--since", help="Start (date or ISO datetime, shop timezone); "
                                     "default 30 days before --until."),
    until: str | None = typer.Option(None, "--until", help="End, exclusive (date or ISO datetime); default now."),
    html: Path | None = typer.Option(None, "--html", help="Also write a self-contained HTML report with charts."),
    by: str = typer.Option("day", "--by", help="Trend buckets: day or week."),
    model: str = typer.Option("last_touch", "--model", help="Attribution: last_touch or first_touch."),
    window_days: float = typer.Option(7.0, "--window-days", help="Attribution window after a touch, in days."),
    touch: str | None = typer.Option(None, "--touch", help="Touch level for every channel: clicked, opened or "
                                     "delivered (default: opened for email and push, delivered for SMS)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    refresh: bool = typer.Option(True, "--refresh/--no-refresh", help="Recompute attributions for the period "
                                 "first (default) or report on the stored ones."),
    max_unsubscribe_rate: float = typer.Option(0.005, "--max-unsubscribe-rate", min=0.0, max=1.0,
                                               help="Frequency section: weekly unsubscribe-rate ceiling per member."),
    max_complaint_rate: float = typer.Option(0.001, "--max-complaint-rate", min=0.0, max=1.0,
                                             help="Frequency section: weekly complaint-rate ceiling per member."),
    cuped: bool = typer.Option(False, "--cuped", help="Also show treated-vs-holdout conversion and revenue per member "
                               "adjusted for each member's purchases before the run (CUPED), with the variance "
                               "reduction beside the unadjusted interval."),
    cuped_days: int = typer.Option(90, "--cuped-days", min=1, max=3660,
                                   help="CUPED pre-period: the days before each run's as_of whose purchases are the "
                                   "covariate."),
    cltv: bool = typer.Option(False, "--cltv", help="Also show each holdout comparison's arms by expected residual "
                              "lifetime value (fitted on purchases before --since) and the value of the members "
                              "who converted."),
) -> None:
    """Funnel per campaign x segment x channel, treated vs holdout lift, variant tests, frequency evidence,
    programme lift, shop KPIs and trends."""
    from membercare.engagement.attribution import AttributionModel, AttributionSettings
    from membercare.reports import ReportOptions, build_report, variant_settings_from_campaigns
    from membercare.timeutil import parse_as_of

    settings = state.settings
    try:
        end = parse_as_of(until, settings.shop_timezone)
        start = parse_as_of(since, settings.shop_timezone) if since else end - timedelta(days=30)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if by not in ("day", "week"):
        raise InputError(f"--by must be day or week, not {by!r}")
    if model not in ("last_touch", "first_touch"):
        raise InputError(f"--model must be last_touch or first_touch, not {model!r}")
    if touch is not None and touch not in ("clicked", "opened", "delivered"):
        raise InputError(f"--touch must be clicked, opened or delivered, not {touch!r}")
    if not window_days > 0:
        raise InputError("--window-days must be positive")
    attribution = AttributionSettings(window=timedelta(days=window_days), model=AttributionModel(model))
    campaigns = _campaigns(settings)
    if touch:
        attribution = attribution.with_level(touch)
    options = ReportOptions(
        since=start, until=end, campaign=campaign, granularity="week" if by == "week" else "day",
        timezone=settings.shop_timezone,
        attribution=attribution, sms_price_minor=_shop_sms_price(settings), currency=settings.shop_currency,
        segments=_segments(campaigns), refresh=refresh, variant_settings=variant_settings_from_campaigns(campaigns),
        max_unsubscribe_rate=max_unsubscribe_rate, max_complaint_rate=max_complaint_rate, cuped=cuped,
        cuped_pre_days=cuped_days, cltv=cltv, **ReportOptions.campaign_fields(campaigns),
    )
    engine = migrated_engine()
    if campaign:
        _check_campaign(engine, campaign)
    rep = build_report(engine, options)
    if html is not None:
        from membercare.reports.html import write_html

        write_html(rep, html)
    if as_json:
        print(json.dumps(rep.to_dict(), ensure_ascii=False, indent=2))
        return
    _print(rep)
    if html is not None:
        console.print(f"HTML report written to {html}")


def _check_campaign(engine, campaign: str) -> None:
    import sqlalchemy as sa

    from membercare.delivery.models import CampaignRun

    r = CampaignRun.__table__
    with engine.connect() as conn:
        known = list(conn.execute(sa.select(r.c.campaign).distinct().order_by(r.c.campaign)).scalars())
    if campaign not in known:
        from membercare.errors import UnknownNameError

        raise UnknownNameError("campaign (with runs)", campaign, known)


def _money(minor, currency: str) -> str:
    return "-" if minor is None else f"{minor / 100:,.0f} {currency}"


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _print(rep) -> None:
    o, cur = rep.options, rep.options.currency
    from membercare.timeutil import shop_date_label

    since, until = shop_date_label(o.since, o.timezone), shop_date_label(o.until, o.timezone)
    console.print(f"[bold]Campaign report[/] {since.rsplit(' ', 1)[0]} - {until}"
                  f"{' · ' + o.campaign if o.campaign else ''} · attribution {o.attribution.model.value}, "
                  f"{o.attribution.window_seconds / 86400:g} d window")
    t = Table(title="Funnel (campaign x segment x channel)")
    for col in ("campaign", "segment", "channel", "planned", "sent", "delivered", "opened", "clicked", "converted",
                "revenue", "unsub.", "SMS segm.", "SMS cost"):
        t.add_column(col, justify="left" if col in ("campaign", "segment", "channel") else "right")
    from membercare.reports.funnel import NO_CHANNEL, NO_CHANNEL_NOTE, channel_label

    for r in [*rep.funnel, rep.totals]:
        t.add_row(r.campaign, r.segment or "-", channel_label(r.channel), f"{r.planned:,}", f"{r.sent:,}",
                  f"{r.delivered:,}", f"{r.opened:,}", f"{r.clicked:,}", f"{r.converted:,}",
                  _money(r.revenue_minor, cur),
                  f"{r.unsubscribed:,}", f"{r.sms_segments:,}",
                  _money(r.sms_cost_minor, cur) if r.sms_segments else "-",
                  style="bold" if r is rep.totals else None)
    console.print(t)
    if any(r.channel == NO_CHANNEL for r in rep.funnel):
        console.print(f"  {NO_CHANNEL_NOTE}")

    from membercare.reports.text import print_experiments

    print_experiments(console, rep)  # treated vs holdout (visit, conversion, revenue), programme, variants, frequency

    k = rep.kpis
    t = Table(title=f"Shop KPIs (as of {shop_date_label(k.as_of, o.timezone, with_time=False)}, trailing "
                    f"{k.window_days} days)")
    t.add_column("KPI")
    t.add_column("value", justify="right")
    t.add_row("members", f"{k.members_total:,}")
    t.add_row("members by tier", ", ".join(f"{tier} {n:,}" for tier, n in k.members_by_tier.items()) or "-")
    t.add_row("active members", f"{k.active_members:,}")
    t.add_row("repurchase rate", _pct(k.repurchase_rate))
    t.add_row("average order value", _money(k.aov_minor, cur))
    t.add_row("purchases per buyer per year", "-" if k.purchases_per_buyer_per_year is None
              else f"{k.purchases_per_buyer_per_year:.2f}")
    t.add_row("expected lifetime", "-" if k.expected_lifetime_years is None
              else f"{k.expected_lifetime_years:.1f} y{' (assumed)' if k.lifetime_assumed else ''}")
    t.add_row("est. customer lifetime value", _money(k.clv_minor, cur))
    if k.bgnbd:
        t.add_row(f"BG/NBD expected purchases / buyer ({k.bgnbd['horizon_days']} d)",
                  f"{k.bgnbd['mean_expected_purchases']:.2f}")
    console.print(t)

    t = Table(title=f"Trend per {o.granularity} ({o.timezone})")
    for col in ("from", "sent", "delivered", "opened", "clicked", "unsub.", "conversions", "revenue"):
        t.add_column(col, justify="left" if col == "from" else "right")
    for p in rep.trends:
        t.add_row(p.bucket.isoformat(), f"{p.sent:,}", f"{p.delivered:,}", f"{p.opened:,}", f"{p.clicked:,}",
                  f"{p.unsubscribed:,}", f"{p.conversions:,}", _money(p.revenue_minor, cur))
    console.print(t)
