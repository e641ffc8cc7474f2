"""The campaign stages under their former module name, while callers move to :mod:`membercare.campaigns`."""

import os  # noqa: F401 - tests patch os.cpu_count through this module

from membercare.campaigns.audience import DEFAULT_GROUP_SIZE, Audience, AudienceEntry, resolve_audience
from membercare.campaigns.dispatch import DispatchOutcome, dispatch_round, run_progress
from membercare.campaigns.dry_run import DryRunReport, RenderedSample, dry_run, write_preview
from membercare.campaigns.occurrence import (
    DEFAULT_BATCH_SIZE,
    MAX_PROCESSES,
    PreparedRun,
    RunOptions,
    holdout_rate_for,
    occurrence_key,
    prepare,
    segment_params_for,
)
from membercare.campaigns.offers import coupon_code, issue_offer_coupons
from membercare.campaigns.plan import (
    DEFAULT_MAX_PROCESSES,
    POOL_MIN_MEMBERS,
    PlannerRenderer,
    PlanOutcome,
    RenderFailed,
    ensure_run,
    make_plan_hooks,
    make_renderer,
    plan_group,
    planning_processes,
    recipients_for_batch,
    shutdown_planning_pools,
)
from membercare.campaigns.run import CampaignResult, run_campaign
from membercare.campaigns.summary import RunSummary, dry_run_summary, summarise
from membercare.campaigns.triggers import EVENT_ALIASES, TriggeredRun, find_member, plan_trigger, trigger_events
from membercare.engagement.sync import SyncReport, sync_engagement

__all__ = [
    "Audience", "AudienceEntry", "CampaignResult", "DispatchOutcome", "DryRunReport", "PlanOutcome",
    "PlannerRenderer", "PreparedRun", "RenderFailed", "RenderedSample", "RunOptions", "RunSummary", "SyncReport",
    "EVENT_ALIASES", "TriggeredRun", "find_member", "plan_trigger", "trigger_events", "DEFAULT_BATCH_SIZE",
    "DEFAULT_GROUP_SIZE", "DEFAULT_MAX_PROCESSES", "MAX_PROCESSES", "POOL_MIN_MEMBERS",
    "coupon_code", "dispatch_round", "dry_run", "dry_run_summary", "ensure_run", "holdout_rate_for",
    "issue_offer_coupons", "make_plan_hooks", "make_renderer", "occurrence_key", "plan_group", "prepare",
    "planning_processes", "recipients_for_batch", "resolve_audience", "run_campaign", "run_progress",
    "segment_params_for", "shutdown_planning_pools", "summarise", "sync_engagement", "write_preview",
]
