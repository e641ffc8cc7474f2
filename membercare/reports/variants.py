"""Variant (A/B/n) tests: per campaign with template variants, sends, clicks and credited conversions per
variant, Beta posteriors on the goal, P(best), realised and next shares (:mod:`membercare.optimise.bandit`).

The winner is the bandit's: the run-stratified always-valid test of :mod:`membercare.optimise.sequential`, fed
with the counts of each run separately (pooling runs while the shares change lets a drift of the base rate pass
for a difference between variants). The pooled posteriors and P(best) are shown as a description only."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import OutboxState
from membercare.engagement.attribution_models import ConversionType
from membercare.optimise import bandit
from membercare.reports.options import ReportOptions
from membercare.reports.sql import CONTROLS, OB, VISITED, A, E, scope, sum_if


@dataclass
class VariantRow:
    """One variant of a campaign's A/B/n test over the period: results, posterior and shares."""

    name: str
    rows: int  # outbox rows assigned this variant (sent or not)
    sends: int
    clicks: int  # sent messages with a click (or push tap)
    conversions: int  # sent messages credited with an order by the attribution model
    revenue_minor: int
    posterior_alpha: float
    posterior_beta: float
    posterior_mean: float
    credible_interval: tuple[float, float]
    p_best: float
    next_share: float  # the bandit's share for the next run (floor applied; 1/0 after promotion)
    latest_share: float | None  # realised share of rows in the campaign's latest run of the period
    planned_share: float | None = None  # the share planning recorded for that run (variant_allocations)


@dataclass
class VariantSection:
    campaign: str
    goal: str
    floor: float
    promote_at: float
    latest_occurrence: str | None
    winner: str | None  # P(best) >= promote_at with enough sends: the bandit promotes it
    promoted: str | None  # the winner planning recorded for the latest run (variant_allocations)
    variants: list[VariantRow]
    notes: list[str] = field(default_factory=list)
    plan_reason: str | None = None  # how planning decided the latest run's shares (uniform, bandit, promoted)
    # The run-stratified always-valid test (membercare.optimise.sequential.Evidence.to_dict()): the leader against
    # every other variant, each pair at 2 alpha / K; None for a single variant or a fixed split.
    evidence: dict[str, Any] | None = None
    runs: int = 0  # runs of the period the test is stratified over


@dataclass
class _Counts:
    rows: int = 0
    sends: int = 0
    clicks: int = 0
    conversions: int = 0
    revenue: int = 0

    def add(self, other: _Counts) -> None:
        for name in ("rows", "sends", "clicks", "conversions", "revenue"):
            setattr(self, name, getattr(self, name) + getattr(other, name))



def variant_settings_from_campaigns(campaigns: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """``ReportOptions.variant_settings`` from campaign definitions (their ``optimise.variants`` blocks)."""
    out = {}
    for c in campaigns:
        test = getattr(getattr(c, "optimise", None), "variants", None)
        if test is not None:
            out[c.name] = {"names": list(test.names), "goal": test.goal, "floor": test.floor,
                           "promote_at": test.promote_at}
    return out


def _recorded_allocations(conn: Connection, campaigns: list[str]) -> dict[tuple[str, str], Any]:
    """What planning recorded per occurrence (``variant_allocations``, written by
    :mod:`membercare.optimise.variants`): shares, promoted winner and why. Empty when the table is absent."""
    if "variant_allocations" not in set(sa.inspect(conn).get_table_names()):
        return {}
    va = sa.table("variant_allocations", sa.column("campaign"), sa.column("occurrence"), sa.column("shares"),
                  sa.column("winner"), sa.column("reason"))
    return {(r.campaign, r.occurrence): r for r in conn.execute(
        sa.select(va.c.campaign, va.c.occurrence, va.c.shares, va.c.winner, va.c.reason).where(
            va.c.campaign.in_(campaigns)))}


def _shares(text: str | None) -> dict[str, float]:
    try:
        data = json.loads(text or "{}")
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (TypeError, ValueError):
        return {}


def variant_sections(conn: Connection, options: ReportOptions) -> list[VariantSection]:
    """Per campaign with template variants in the period: sends, clicks and credited conversions per variant
    (SQL), each variant's Beta posterior on the campaign's goal, P(best) and the bandit's next shares
    (:func:`membercare.optimise.bandit.allocate`), and the realised shares of the latest run."""
    r = sa.table("campaign_runs", sa.column("id"), sa.column("occurrence"))
    credit = sa.select(
        A.c.message_id, sa.func.count().label("orders"), sa.func.sum(A.c.revenue_minor).label("revenue"),
    ).where(A.c.model == options.attribution.model.value, A.c.conversion_type == ConversionType.ORDER.value
            ).group_by(A.c.message_id).subquery("variant_credit")
    sent = OB.c.state == OutboxState.SENT.value
    clicked = sa.exists().where(E.c.message_id == OB.c.message_id, E.c.kind.in_(VISITED))
    is_variant = [OB.c.variant.is_not(None), OB.c.variant.not_in(CONTROLS)]
    query = sa.select(
        OB.c.campaign, OB.c.variant, sa.func.count().label("rows"), sum_if(sent).label("sends"),
        sum_if(sa.and_(sent, clicked)).label("clicks"),
        sum_if(sa.and_(sent, credit.c.orders > 0)).label("conversions"),
        sa.func.coalesce(sa.func.sum(credit.c.revenue), 0).label("revenue"),
    ).add_columns(OB.c.run_id).select_from(OB.outerjoin(credit, credit.c.message_id == OB.c.message_id)).where(
        *scope(options), *is_variant).group_by(OB.c.campaign, OB.c.run_id, OB.c.variant).order_by(OB.c.run_id)
    # Counts per run (the stratified test compares variants within a run, while the shares change between runs)
    # and their totals over the period (the posteriors, which describe; they decide nothing).
    per_campaign: dict[str, dict[str, _Counts]] = {}
    per_run: dict[str, dict[int, dict[str, _Counts]]] = {}
    for row in conn.execute(query):
        counts = _Counts(int(row.rows), int(row.sends), int(row.clicks), int(row.conversions), int(row.revenue))
        per_run.setdefault(row.campaign, {}).setdefault(int(row.run_id), {})[row.variant] = counts
        per_campaign.setdefault(row.campaign, {}).setdefault(row.variant, _Counts()).add(counts)
    if not per_campaign:
        return []
    latest_ids = sa.select(OB.c.campaign, sa.func.max(OB.c.run_id).label("run_id")).where(
        *scope(options), *is_variant).group_by(OB.c.campaign).subquery("latest_run")
    latest: dict[str, dict[str, Any]] = {}
    for row in conn.execute(
        sa.select(latest_ids.c.campaign, r.c.occurrence, OB.c.variant, sa.func.count().label("n"))
        .select_from(latest_ids.join(r, r.c.id == latest_ids.c.run_id).join(OB, OB.c.run_id == latest_ids.c.run_id))
        .where(*is_variant).group_by(latest_ids.c.campaign, r.c.occurrence, OB.c.variant)
    ):
        info = latest.setdefault(row.campaign, {"occurrence": row.occurrence, "rows": {}})
        info["rows"][row.variant] = int(row.n)
    recorded = _recorded_allocations(conn, sorted(per_campaign))

    out = []
    for campaign in sorted(per_campaign):
        found = per_campaign[campaign]
        conf = dict(options.variant_settings.get(campaign) or {})
        goal = conf.get("goal", "click")
        configured = [n for n in conf.get("names", ()) if n in found]
        names = configured + sorted(n for n in found if n not in configured)
        successes = "clicks" if goal == "click" else "conversions"
        stats_ = [bandit.VariantStats(n, found[n].sends, getattr(found[n], successes)) for n in names]
        runs = [[bandit.VariantStats(n, run[n].sends if n in run else 0, getattr(run[n], successes) if n in run else 0)
                 for n in names] for run in per_run[campaign].values()]
        floor = min(float(conf.get("floor", bandit.DEFAULT_FLOOR)), 1.0 / len(names))
        threshold = float(conf.get("promote_at", bandit.DEFAULT_THRESHOLD))
        alloc = bandit.allocate(stats_, goal=goal, floor=floor, threshold=threshold,
                                seed=bandit.seed_for(campaign, f"report:{options.until.isoformat()}"),
                                confidence=options.confidence, runs=runs)
        info = latest.get(campaign, {"occurrence": None, "rows": {}})
        total = sum(info["rows"].values())
        plan = recorded.get((campaign, info["occurrence"]))
        planned = _shares(plan.shares) if plan is not None else {}
        rows = []
        for v in alloc.variants:
            f = found[v.name]
            rows.append(VariantRow(
                name=v.name, rows=f.rows, sends=f.sends, clicks=f.clicks, conversions=f.conversions,
                revenue_minor=f.revenue, posterior_alpha=v.posterior_alpha, posterior_beta=v.posterior_beta,
                posterior_mean=v.posterior_mean, credible_interval=v.credible_interval, p_best=v.p_best,
                next_share=v.share, latest_share=info["rows"].get(v.name, 0) / total if total else None,
                planned_share=planned.get(v.name)))
        out.append(VariantSection(campaign=campaign, goal=goal, floor=floor, promote_at=threshold,
                                  latest_occurrence=info["occurrence"], winner=alloc.winner if len(names) > 1 else None,
                                  promoted=plan.winner if plan is not None else None,
                                  plan_reason=plan.reason if plan is not None else None,
                                  variants=rows, notes=list(alloc.notes), evidence=alloc.evidence,
                                  runs=len(runs)))
    return out

