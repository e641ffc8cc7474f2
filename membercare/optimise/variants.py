"""Template-variant tests: the variant shares of each campaign occurrence, decided once and stored.

The shares of a new occurrence come from the Thompson-sampling bandit (:mod:`membercare.optimise.bandit`)
over the earlier occurrences' sends and successes (clicks or attributed conversions), or from a winner
promoted earlier; :func:`allocation_for` stores them in ``variant_allocations`` (first writer wins), so every
planning group, rerun and resume of the occurrence gives each member the same variant. The planner's
``assign`` hook (:class:`membercare.optimise.hooks.Assigner`) draws members from the stored shares. See
``docs/optimisation.md`` (sections 3 and 8).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field

from membercare.campaigns.definition import VariantTest
from membercare.db import insert_for
from membercare.delivery.models import CampaignRun, OutboxMessage, OutboxState
from membercare.engagement.attribution_models import Attribution, AttributionModel
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.models import TableModel
from membercare.optimise import bandit
from membercare.optimise.history import CLICK_KINDS
from membercare.timeutil import UTCDateTime, ensure_utc, utcnow


class VariantAllocation(TableModel, table=True):
    """The template-variant shares of one campaign occurrence (migration ``0007_variants``).

    Written once, when the occurrence is first planned (first writer wins), so that every planning
    group, rerun and resume gives each member the same variant. ``report`` is the bandit's
    :class:`~membercare.optimise.bandit.BanditReport` as JSON (posterior, P(best) and share per variant);
    ``reason`` says how the shares were decided (uniform start, bandit, promoted winner).
    """

    __tablename__ = "variant_allocations"
    __table_args__ = (
        sa.UniqueConstraint("campaign", "occurrence", name="uq_variant_allocations_occurrence"),
        sa.Index("ix_variant_allocations_campaign_as_of", "campaign", "as_of"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"))
    campaign: str = Field(max_length=64)
    occurrence: str = Field(max_length=64)
    as_of: datetime = Field(sa_type=UTCDateTime, nullable=False)
    goal: str = Field(max_length=16)
    names: str = Field(max_length=200, description="comma-separated variant names, control first")
    shares: str = Field(sa_type=sa.Text, description="JSON {variant: share}")
    winner: str | None = Field(default=None, max_length=32)
    reason: str = Field(max_length=500)
    report: str = Field(sa_type=sa.Text, description="JSON of the BanditReport")
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False, default_factory=utcnow)


@dataclass(frozen=True)
class Allocation:
    """The variant shares of one occurrence and how they were decided."""

    campaign: str
    occurrence: str
    names: tuple[str, ...]
    shares: dict[str, float]
    winner: str | None
    reason: str
    report: dict
    stored: bool  # False for a dry run's allocation that was not written


def variant_stats_by_run(conn: Connection, campaign: str, names: Sequence[str], goal: str,
                         before: datetime) -> list[list[bandit.VariantStats]]:
    """Sends and goal successes per earlier run and variant (runs planned for before ``before``, oldest first).

    Two ``GROUP BY run, variant`` queries: sends over the earlier runs' outbox rows in state sent (holdout and
    control rows are never sent, so never counted), and successes, which start from the (far fewer)
    successes: for ``click`` the messages with a clicked or push_opened event, joined to their outbox row;
    for ``conversion`` the messages credited with a conversion by last-touch attribution. The per-run split
    is what the promotion test stratifies on (:mod:`membercare.optimise.sequential`).
    """
    o, r = OutboxMessage.__table__, CampaignRun.__table__
    earlier = sa.select(r.c.id).where(r.c.campaign == campaign, r.c.as_of < ensure_utc(before))
    names = list(names)
    sends: dict[tuple[int, str], int] = {(int(run), v): int(n) for run, v, n in conn.execute(
        sa.select(o.c.run_id, o.c.variant, sa.func.count())
        .where(o.c.run_id.in_(earlier), o.c.state == OutboxState.SENT.value, o.c.variant.in_(names))
        .group_by(o.c.run_id, o.c.variant)).tuples().all()}
    if goal == "click":
        e = EngagementEventRow.__table__
        clicked = sa.select(e.c.message_id).where(e.c.kind.in_(CLICK_KINDS)).distinct().subquery("clicked")
        successes = sa.select(o.c.run_id, o.c.variant, sa.func.count()).select_from(
            clicked.join(o, o.c.message_id == clicked.c.message_id)).where(
            o.c.run_id.in_(earlier), o.c.state == OutboxState.SENT.value, o.c.variant.in_(names)
        ).group_by(o.c.run_id, o.c.variant)
    elif goal == "conversion":
        a = Attribution.__table__
        successes = sa.select(a.c.run_id, a.c.variant, sa.func.count(sa.distinct(a.c.message_id))).where(
            a.c.model == AttributionModel.LAST_TOUCH.value, a.c.campaign == campaign, a.c.run_id.in_(earlier),
            a.c.variant.in_(names)).group_by(a.c.run_id, a.c.variant)
    else:
        raise InputError(f"unknown variant goal {goal!r}; valid: click, conversion")
    wins = {(int(run), v): int(n) for run, v, n in conn.execute(successes).tuples().all()}
    run_ids = sorted({run for run, _ in sends})
    return [[bandit.VariantStats(n, sends.get((run, n), 0), min(wins.get((run, n), 0), sends.get((run, n), 0)))
             for n in names] for run in run_ids]


def variant_stats(conn: Connection, campaign: str, names: Sequence[str], goal: str,
                  before: datetime) -> list[bandit.VariantStats]:
    """Sends and goal successes per variant over the campaign's occurrences planned for before ``before``
    (the per-run counts of :func:`variant_stats_by_run`, summed)."""
    return _pooled(list(names), variant_stats_by_run(conn, campaign, names, goal, before))


def _pooled(names: list[str], runs: list[list[bandit.VariantStats]]) -> list[bandit.VariantStats]:
    return [bandit.VariantStats(n, sum(r[i].sends for r in runs), sum(r[i].successes for r in runs))
            for i, n in enumerate(names)]


def compute_allocation(conn: Connection, campaign: str, occurrence: str, as_of: datetime, test: VariantTest, *,
                       min_sends: int = bandit.DEFAULT_MIN_SENDS, draws: int = bandit.DEFAULT_DRAWS) -> Allocation:
    """The shares of a new occurrence: the promoted winner of an earlier occurrence with the same variant
    names (promotion is final), else the bandit over the earlier occurrences (uniform without data)."""
    names = tuple(test.names)
    va = VariantAllocation.__table__
    prev = conn.execute(
        sa.select(va.c.occurrence, va.c.winner, va.c.report).where(
            va.c.campaign == campaign, va.c.as_of < ensure_utc(as_of), va.c.winner.is_not(None),
            va.c.names == ",".join(names))
        .order_by(va.c.as_of.desc()).limit(1)
    ).first()
    if prev is not None and prev.winner in names:
        shares = {n: 1.0 if n == prev.winner else 0.0 for n in names}
        return Allocation(campaign, occurrence, names, shares, prev.winner,
                          f"winner {prev.winner} promoted in occurrence {prev.occurrence}", json.loads(prev.report),
                          False)
    runs = variant_stats_by_run(conn, campaign, names, test.goal, as_of)
    stats = _pooled(list(names), runs)
    rep = bandit.allocate(stats, goal=test.goal, floor=test.floor, threshold=test.promote_at, min_sends=min_sends,
                          draws=draws, seed=bandit.seed_for(campaign, occurrence), runs=runs)
    p_best = {v.name: v.p_best for v in rep.variants}
    if rep.winner is not None:
        reason = f"promoted {rep.winner}: {_evidence_line(rep.evidence)}"
    elif sum(s.sends for s in stats) == 0:
        reason = "first occurrence (no sends of earlier occurrences): uniform"
    else:
        reason = "bandit: P(best) " + ", ".join(f"{n} {p_best[n]:.3f}" for n in names) + f", floor {test.floor}"
        if rep.notes:
            reason += "; " + "; ".join(rep.notes)
    return Allocation(campaign, occurrence, names, {n: float(rep.shares[n]) for n in names}, rep.winner,
                      reason[:500], rep.to_dict(), False)


def _evidence_line(evidence: dict | None) -> str:
    """One line of the promotion's evidence for ``reason`` (the full evidence is in ``report``)."""
    if not evidence:
        return "single variant"
    worst = min(evidence["pairs"], key=lambda p: p["log_likelihood_ratio"])
    lo, hi = worst["interval"]
    return (f"beats every variant in the run-stratified sequential test at false-winner rate {evidence['alpha']:.3g} "
            f"over {evidence['runs']} runs; weakest pair vs {worst['other']}: difference {worst['difference']:+.4f} "
            f"(always-valid interval {lo:+.4f} .. {hi:+.4f}), log LR {worst['log_likelihood_ratio']:.2f} >= "
            f"{worst['bound']:.2f}")


def _from_row(row: sa.Row) -> Allocation:
    return Allocation(row.campaign, row.occurrence, tuple(row.names.split(",")), json.loads(row.shares), row.winner,
                      row.reason, json.loads(row.report), True)


def stored_allocation(conn: Connection, campaign: str, occurrence: str) -> Allocation | None:
    va = VariantAllocation.__table__
    row = conn.execute(sa.select(va).where(va.c.campaign == campaign, va.c.occurrence == occurrence)).first()
    return None if row is None else _from_row(row)


def allocation_for(engine: Engine, campaign: str, occurrence: str, as_of: datetime, test: VariantTest, *,
                   store: bool = True, min_sends: int = bandit.DEFAULT_MIN_SENDS) -> Allocation:
    """The occurrence's variant shares: the stored ones, else computed now and stored (first writer wins).

    ``store=False`` (dry runs) computes without writing. Raises :class:`InputError` when the occurrence was
    allocated for other variant names than the campaign now declares (finish it, or run a new occurrence).
    """
    names = tuple(test.names)
    with engine.connect() as conn:
        got = stored_allocation(conn, campaign, occurrence)
        if got is None:
            got = compute_allocation(conn, campaign, occurrence, as_of, test, min_sends=min_sends)
    if got.stored or not store:
        if got.names != names:
            raise InputError(f"{campaign}/{occurrence} was allocated for variants {', '.join(got.names)} but the "
                             f"campaign now declares {', '.join(names)}: finish that occurrence with its variants, "
                             f"or run a new occurrence (occurrence tag)")
        return got
    va = VariantAllocation.__table__
    with engine.begin() as conn:
        conn.execute(insert_for(conn, va).on_conflict_do_nothing(index_elements=["campaign", "occurrence"]), dict(
            campaign=campaign, occurrence=occurrence, as_of=ensure_utc(as_of), goal=test.goal, names=",".join(names),
            shares=json.dumps(got.shares, sort_keys=True), winner=got.winner, reason=got.reason,
            report=json.dumps(got.report, sort_keys=True), created_at=utcnow()))
        stored = stored_allocation(conn, campaign, occurrence)
    if stored is None:  # pragma: no cover - the row was just inserted or already there
        raise InputError(f"{campaign}/{occurrence}: the variant allocation could not be stored")
    if stored.names != names:
        raise InputError(f"{campaign}/{occurrence} was allocated concurrently for variants {', '.join(stored.names)}")
    return stored


__all__ = ["Allocation", "VariantAllocation", "allocation_for", "compute_allocation", "stored_allocation",
           "variant_stats", "variant_stats_by_run"]
