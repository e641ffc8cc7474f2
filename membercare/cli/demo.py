"""``membercare demo``: the main job on the embedded defaults.

Creates (or upgrades) the SQLite database under ``$MEMBERCARE_HOME`` (default ``./.membercare``),
generates a demo shop the first time, and prints what the shop holds. Later stages (the day's
lifecycle campaigns through the Prefect flows, the sandbox, engagement, reports) plug in here.
Running it again reuses the shop: nothing is generated or sent twice.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, migrated_engine, state
from membercare.models import (
    PURCHASE_STATUSES,
    Consent,
    Coupon,
    Device,
    Member,
    Order,
)
from membercare.timeutil import utcnow


def shop_overview(conn: sa.Connection, as_of=None) -> list[tuple[str, str]]:
    """Headline figures of the shop, computed in SQL."""
    as_of = as_of or utcnow()
    m, o, c, d, cs = (t.__table__ for t in (Member, Order, Coupon, Device, Consent))
    members = conn.execute(sa.select(sa.func.count()).select_from(m)).scalar_one()
    tiers = conn.execute(sa.select(m.c.tier, sa.func.count()).group_by(m.c.tier).order_by(m.c.tier)).all()
    orders, revenue = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.total_minor), 0)).where(o.c.status.in_(PURCHASE_STATUSES))
    ).one()
    buyers = conn.execute(
        sa.select(sa.func.count(sa.distinct(o.c.member_id))).where(o.c.status.in_(PURCHASE_STATUSES))
    ).scalar_one()
    open_coupons = conn.execute(
        sa.select(sa.func.count()).select_from(c).where(c.c.redeemed_at.is_(None), c.c.expires_at > as_of)
    ).scalar_one()
    live_devices = conn.execute(
        sa.select(sa.func.count()).select_from(d).where(d.c.invalidated_at.is_(None))
    ).scalar_one()
    optouts = conn.execute(
        sa.select(cs.c.channel, sa.func.count())
        .where(cs.c.purpose == "marketing", cs.c.granted.is_(False))
        .group_by(cs.c.channel).order_by(cs.c.channel)
    ).all()
    return [
        ("members", f"{members:,}"),
        ("members by tier", ", ".join(f"{t} {n:,}" for t, n in tiers) or "-"),
        ("purchases", f"{orders:,} orders by {buyers:,} buyers, NT${revenue / 100:,.0f}"),
        ("open coupons", f"{open_coupons:,}"),
        ("live push devices", f"{live_devices:,}"),
        ("marketing opt-outs", ", ".join(f"{ch} {n:,}" for ch, n in optouts) or "-"),
    ]


@app.command("demo")
def demo(
    members: int = typer.Option(3000, "--members", help="Size of the demo shop generated on the first run."),
    seed: int = typer.Option(7, "--seed", help="Random seed of the demo shop."),
) -> None:
    """Run the main job on embedded defaults: SQLite, a generated demo shop, and a summary."""
    from membercare.generator import generate_shop

    started = time.monotonic()
    engine = migrated_engine()
    console.print(f"[bold]membercare demo[/] database: {state.settings.db_url}")
    with engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(Member.__table__)).scalar_one()
    if existing:
        console.print(f"using the existing demo shop ({existing:,} members)")
    else:
        from rich.progress import Progress

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"generating a demo shop of {members:,} members", total=members)
            summary = generate_shop(engine, members=members, seed=seed,
                                    progress=lambda done, total: progress.update(task, completed=done, total=total))
        console.print(f"generated a demo shop of {members:,} members in {summary.seconds:.1f} s (seed {seed})")
    with engine.connect() as conn:
        rows = shop_overview(conn)
    table = Table(title="Demo shop", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    console.print(f"done in {time.monotonic() - started:.1f} s. Try: membercare members show <member id>")
