"""``membercare members ...``: look up one member."""

from __future__ import annotations

from datetime import datetime

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, migrated_engine
from membercare.errors import InputError

members_app = typer.Typer(help="Look up members: profile, consents, tier, orders and coupons.", no_args_is_help=True)
app.add_typer(members_app, name="members")


def coupon_state(coupon: dict, now: datetime) -> str:
    """Redeemed, expired or open, as of ``now`` (an expired coupon is no longer open)."""
    from membercare.timeutil import ensure_utc

    if coupon["redeemed_at"]:
        return f"redeemed {coupon['redeemed_at']:%Y-%m-%d}"
    if coupon["expires_at"] is not None and ensure_utc(coupon["expires_at"]) <= now:
        return "expired"
    return "open"


def _value_text(mv, currency: str) -> str:
    """Expected residual lifetime value and P(alive) at as_of, or why there is none."""
    when = f"{mv.as_of:%Y-%m-%d %H:%M} UTC"
    if not mv.known:
        return f"- ({mv.note}; as of {when})"
    return (f"{mv.value_minor / 100:,.2f} {currency} expected, P(alive) {mv.p_alive:.0%}, "
            f"{mv.purchase_days} purchase day(s) (BG/NBD + Gamma-Gamma as of {when})")


@members_app.command("show")
def show(
    member: str = typer.Argument(..., help="The shop's member id (external id)."),
    orders: int = typer.Option(5, "--orders", help="How many recent orders to list."),
    reveal: bool = typer.Option(False, "--reveal", help="Show full email and phone (they are masked by default)."),
    show_value: bool = typer.Option(True, "--value/--no-value", help="Show the expected residual lifetime value and "
                               "P(alive) (fits the shop's purchase and spend models at --as-of)."),
    as_of: str | None = typer.Option(None, "--as-of", help="Evaluate the lifetime value at this date or ISO "
                                     "datetime (shop timezone; default now)."),
    months: int = typer.Option(12, "--value-months", min=1, max=120, help="Lifetime value horizon in months."),
    discount: float = typer.Option(0.10, "--value-discount", min=0.0, max=1.0,
                                   help="Annual discount rate of future value."),
) -> None:
    """Show a member's profile, consents, tier history, recent orders, coupons and expected lifetime value."""
    from membercare.cli.common import state as cli_state
    from membercare.members import member_profile, member_value
    from membercare.timeutil import parse_as_of, utcnow

    try:
        when = parse_as_of(as_of, cli_state.settings.shop_timezone)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    with migrated_engine().connect() as conn:
        p = member_profile(conn, member, recent_orders=orders)
        mv = member_value(conn, p.member["id"], when, months=months, annual_discount=discount) if (
            p is not None and show_value) else None
    if p is None:
        raise InputError(f"no member with id {member!r}")
    m = p.member
    from membercare.delivery.contract import redact

    email = m["email"] if reveal else redact(m["email"])
    phone = m["phone"] if reveal else redact(m["phone"])
    head = Table.grid(padding=(0, 2))
    for label, value in [
        ("member", f"{m['external_id']}  {m['name']}"),
        ("email / phone", f"{email} / {phone}"),
        ("locale / timezone", f"{m['locale']} / {m['timezone']}"),
        ("birthday / age group", f"{m['birthday'] or '-'} / {m['age_group'] or '-'}"),
        ("region / city", f"{m['region'] or '-'} / {m['city'] or '-'}"),
        ("joined", f"{m['joined_at']:%Y-%m-%d %H:%M} UTC"),
        ("tier / points", f"{m['tier']} / {m['points_balance']:,}"),
        ("channel preference", m["preferred_channels"].replace(",", " > ")),
        ("purchases", f"{p.purchase_count} orders, {p.purchase_total / 100:,.2f} {p.currency} in total"),
        ("push devices", f"{p.live_devices} live, {p.dead_devices} invalidated"),
        *([] if mv is None else [(f"lifetime value ({mv.months} mo, {mv.annual_discount:.0%}/y discount)",
                                  _value_text(mv, p.currency))]),
    ]:
        head.add_row(f"[bold]{label}[/]", str(value))
    console.print(head)

    t = Table(title="Consent (current)", show_lines=False)
    for col in ("channel", "purpose", "state", "source", "since"):
        t.add_column(col)
    for c in p.consents:
        t.add_row(c["channel"], c["purpose"], "[green]granted[/]" if c["granted"] else "[red]revoked[/]",
                  c["source"], f"{c['changed_at']:%Y-%m-%d}")
    console.print(t)

    if p.tiers:
        t = Table(title="Tier history")
        for col in ("tier", "from", "to", "reason"):
            t.add_column(col)
        for h in p.tiers:
            t.add_row(h["tier"], f"{h['valid_from']:%Y-%m-%d}", f"{h['valid_to']:%Y-%m-%d}" if h["valid_to"] else "-",
                      h["reason"])
        console.print(t)

    t = Table(title=f"Recent orders ({len(p.orders)})")
    for col in ("order", "placed", "status", "total", "categories"):
        t.add_column(col)
    for o in p.orders:
        t.add_row(o["external_id"], f"{o['placed_at']:%Y-%m-%d}", o["status"],
                  f"{o['total_minor'] / 100:,.2f} {o['currency']}", o["categories"] or "")
    console.print(t)

    now = utcnow()
    t = Table(title=f"Coupons ({len(p.coupons)})")
    for col in ("code", "value", "expires", "state"):
        t.add_column(col)
    for c in p.coupons:
        value = (f"{c['percent_off']}% off" if c["kind"] == "percent"
                 else f"{c['amount_minor'] / 100:,.0f} {c['currency']}")
        state = coupon_state(c, now)
        t.add_row(c["code"], value, f"{c['expires_at']:%Y-%m-%d}", state)
    console.print(t)
