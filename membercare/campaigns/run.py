"""A whole campaign occurrence in one process: every stage in order, without Prefect.

:func:`run_campaign` is for scripts, tests and benchmarks; the Prefect flow ``flows/campaign.py`` sequences
the same stages as tasks (:mod:`.occurrence`, :mod:`.audience`, :mod:`.plan` or :mod:`.dry_run`,
:mod:`.dispatch`, :mod:`.summary`).

Exactly-once rests on the database, never on the orchestrator: the occurrence key (campaign, occurrence,
member [, coupon]) is the outbox's unique idempotency key, coupons are issued with deterministic codes
(``INSERT ... ON CONFLICT DO NOTHING``), and dispatch only claims planned or deferred rows. Rerunning any
stage, or the whole run, sends nothing twice. Nothing here logs or returns contact data: audiences are
member ids (plus coupon codes or order references where the message is about one), summaries are counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from membercare.campaigns.audience import resolve_audience
from membercare.campaigns.definition import Campaign
from membercare.campaigns.dispatch import DispatchOutcome, dispatch_round, run_progress
from membercare.campaigns.dry_run import DryRunReport, dry_run
from membercare.campaigns.occurrence import RunOptions, prepare
from membercare.campaigns.plan import PlanOutcome, ensure_run, make_renderer, plan_group
from membercare.campaigns.summary import RunSummary, dry_run_summary, summarise
from membercare.config import Settings
from membercare.delivery.contract import ChannelAdapter
from membercare.delivery.dispatcher import DispatchConfig
from membercare.timeutil import utcnow


@dataclass
class CampaignResult:
    """What :func:`run_campaign` did: the summary, and the outcome of each stage that ran."""

    summary: RunSummary
    plan: PlanOutcome | None = None
    dispatch: DispatchOutcome | None = None
    dry: DryRunReport | None = None


def run_campaign(engine: Engine, settings: Settings, campaign: Campaign | str, options: RunOptions | None = None,
                 *, adapters: Mapping[str, ChannelAdapter] | None = None, dispatch_config: DispatchConfig | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> CampaignResult:
    """Every stage in one process (scripts, tests, benchmarks); the Prefect flow sequences the same stages.

    Without ``adapters`` the run is planned but not dispatched (rows stay planned for a dispatcher).
    ``progress(stage, done, total)`` is called after each planning batch group and dispatch pass.
    """
    options = options or RunOptions()
    started = utcnow()
    prepared = prepare(settings, campaign, options)
    audience = resolve_audience(engine, prepared, snapshot=True)
    try:
        if options.dry_run:
            rep = dry_run(engine, prepared, audience)
            return CampaignResult(dry_run_summary(rep), dry=rep)
        run_id = ensure_run(engine, prepared)
        plan = PlanOutcome(run_id)
        renderer = make_renderer(prepared)
        groups = audience.groups()
        for i, group in enumerate(groups, 1):
            plan = plan.merge(plan_group(engine, prepared, group, renderer=renderer))
            if progress:
                progress("plan", i, len(groups))
    finally:
        audience.release(engine)
    outcome = None
    if adapters is not None:
        outcome = dispatch_round(engine, run_id, adapters, config=dispatch_config)
        if progress:
            done, total = run_progress(engine, run_id)
            progress("dispatch", done, total)
    summary = summarise(engine, run_id, campaign=prepared.name, occurrence=prepared.occurrence,
                        segment_size=audience.size, newly_planned=plan.inserted, sent_since=started)
    return CampaignResult(summary, plan, outcome)


__all__ = ["CampaignResult", "run_campaign"]
