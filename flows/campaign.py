"""``run-campaign``: one campaign occurrence, as Prefect tasks over the stages of :mod:`membercare.campaigns`.

Stages (each a task; never one task per message):

1. ``prepare`` - load the campaign, compute the occurrence key, run the template pre-flight check;
2. ``resolve-segment`` - segment size and the audience's member keys (no contact data);
3. ``plan`` - one task per group of up to ``group_size`` members (coupons, contexts, routing, policies,
   rendering, outbox rows); a failed group is retried alone, idempotently;
4. ``dispatch`` - one task per dispatcher pass: one dispatcher in the task's process, or with
   ``dispatchers`` > 1 that many dispatcher *processes* on the same run (one per core: the SDK work is
   CPU-bound under one GIL; claims stay disjoint through ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and
   SQLite's single writer, see :mod:`membercare.delivery.pool`); more passes while retries fall due within
   ``wait_for_deferred_s``; a progress artifact moves while it sends;
5. ``summarise`` - table and markdown artifacts, one log line of counts.

At most one run per campaign occurrence: the deployments have ``concurrency_limit: 1`` and the outbox's
idempotency key makes a second run (or a rerun after a crash) send nothing twice anyway.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.approval import needs_approval, wait_for_approval
from flows.common import (
    artifact_key,
    engine_for,
    preview_link,
    resolved_env,
    retry_transient,
    run_logger,
    settings_from,
)

# The stages are called through their modules (plan_stage.plan_group, ...), so that the end-to-end benchmark
# can time each domain call from the outside (bench/e2e); types are imported by name.
from membercare.campaigns import audience as audience_stage
from membercare.campaigns import dispatch as dispatch_stage
from membercare.campaigns import dry_run as dry_run_stage
from membercare.campaigns import occurrence as occurrence_stage
from membercare.campaigns import plan as plan_stage
from membercare.campaigns import summary as summary_stage
from membercare.campaigns.audience import DEFAULT_GROUP_SIZE, Audience
from membercare.campaigns.dispatch import DispatchOutcome
from membercare.campaigns.dry_run import DryRunReport
from membercare.campaigns.occurrence import MAX_PROCESSES, PreparedRun, RunOptions
from membercare.campaigns.plan import PlanOutcome
from membercare.campaigns.seed_send import SeedMessage, accepted_count
from membercare.campaigns.summary import RunSummary
from membercare.delivery.dispatcher import DispatchConfig
from membercare.delivery.ratelimit import configured_rates
from membercare.errors import ConfigurationError, DeliveryError, InputError
from membercare.models import Channel
from membercare.timeutil import parse_as_of, utcnow


class CampaignRunParameters(BaseModel):
    """Parameters of ``run-campaign`` (one object, validated before the flow starts)."""

    model_config = ConfigDict(extra="forbid")

    campaign: str = Field(description="campaign name: a folder of templates/ with a campaign.yaml")
    as_of: str | None = Field(default=None, description="date (start of that day, shop time) or ISO datetime; "
                                                        "default: now")
    dry_run: bool = Field(default=False, description="plan and render in memory, send nothing, write nothing")
    limit: int | None = Field(default=None, ge=0, description="at most this many members (tests, canaries)")
    channels: list[Channel] | None = Field(default=None, description="only these of the campaign's channels")
    segment_params: dict[str, Any] = Field(default_factory=dict, description="segment parameter overrides")
    occurrence_tag: str | None = Field(default=None, description="separates several schedules of one campaign")
    holdout_rate: float | None = Field(default=None, ge=0.0, lt=1.0, description="default: campaign params or 10 %")
    members: list[int] | None = Field(default=None, description="explicit audience (member ids) instead of the "
                                                                "segment: event-triggered messages")
    order_ref: str | None = Field(default=None, description="the order a message_per: order message is about")
    event_ref: str | None = Field(default=None, description="the event a triggered message answers")
    occurrence_at: str | None = Field(default=None, description="ISO instant the occurrence key is taken from")
    group_size: int = Field(default=DEFAULT_GROUP_SIZE, ge=100, description="members per planning task")
    processes: int | None = Field(default=None, ge=0, le=MAX_PROCESSES,
                                  description="worker processes that read and render planning batches (the "
                                              "flow's process keeps every write); default: one per core "
                                              "for groups of 5,000 members or more; 0: plan in the flow's "
                                              "process")
    dispatchers: int = Field(default=1, ge=1, le=16,
                             description="dispatcher processes on the run (2 on a 2-core machine uses both cores; "
                                         "rate limits are shared between them); 1: in the task's process")
    fan_out: int = Field(default=0, ge=0, le=64,
                         description="dispatch through this many `dispatch-run` flow runs that any worker of the "
                                     "pool can take (flows/dispatch.py); 0: dispatch in this flow run")
    resume: bool = Field(default=False, description="resume a run paused by its error budget or an operator")
    wait_for_deferred_s: float = Field(default=30.0, ge=0.0, le=3600.0,
                                       description="keep sending retries that fall due within this time")
    test_to: str | None = Field(default=None,
                               description="a test send instead of the run: every channel, locale and variant "
                                           "to this seed list (its name in seeds/, @FILE or comma-separated "
                                           "addresses), as `membercare campaign test --to`; marked [TEST], "
                                           "never in the ledger; nothing else is planned or sent")
    test_member: str | None = Field(default=None, description="with test_to: render for this member (external "
                                                              "or database id) instead of the sample member")
    approval_timeout_s: int = Field(default=86_400, ge=10, le=7 * 86_400,
                                    description="campaigns with approval: required: how long to wait for the "
                                                "decision in the Prefect UI before failing (nothing is sent)")

    @field_validator("as_of")
    @classmethod
    def _as_of(cls, v: str | None) -> str | None:
        if v is not None:
            parse_as_of(v)  # raises ValueError with a clear message
        return v

    def options(self, shop_timezone: str) -> RunOptions:
        return RunOptions(
            as_of=parse_as_of(self.as_of, shop_timezone) if self.as_of else None, dry_run=self.dry_run,
            limit=self.limit, channels=tuple(self.channels) if self.channels else None,
            segment_params=dict(self.segment_params), occurrence_tag=self.occurrence_tag,
            holdout_rate=self.holdout_rate, members=tuple(self.members) if self.members is not None else None,
            order_ref=self.order_ref, event_ref=self.event_ref,
            occurrence_at=parse_as_of(self.occurrence_at, shop_timezone) if self.occurrence_at else None,
            processes=self.processes)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params") or {}
    name = params.get("campaign") if isinstance(params, dict) else getattr(params, "campaign", None)
    dry = params.get("dry_run") if isinstance(params, dict) else getattr(params, "dry_run", False)
    test = params.get("test_to") if isinstance(params, dict) else getattr(params, "test_to", None)
    suffix = "-test-send" if test else "-dry-run" if dry else ""
    return f"{name or 'campaign'}{suffix}-{utcnow():%Y%m%d-%H%M%S}"


# ------------------------------------------------------------------------------------------------- tasks


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(settings, campaign: str, options: RunOptions) -> PreparedRun:
    """Load the campaign, compute its occurrence key, run the template pre-flight check."""
    return occurrence_stage.prepare(settings, campaign, options)


@task(name="resolve-segment", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def resolve_segment(prepared: PreparedRun) -> Audience:
    engine = engine_for(prepared.settings)
    # A snapshot: this process keeps page bounds, not a million keys (released once planned).
    audience = audience_stage.resolve_audience(engine, prepared, snapshot=True)
    run_logger().info("%s/%s: %s has %d members (%d in this run)", prepared.name, prepared.occurrence,
                          audience.source, audience.size, len(audience))
    return audience


@task(name="plan", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=retry_transient, task_run_name="plan-group-{index}")
def plan(prepared: PreparedRun, group: list, index: int) -> PlanOutcome:
    engine = engine_for(prepared.settings)
    out = plan_stage.plan_group(engine, prepared, group)
    run_logger().info("%s/%s group %d: %d members, %d new rows, %d already planned", prepared.name,
                          prepared.occurrence, index, len(group), out.inserted, out.already_planned)
    return out


@task(name="dry-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def dry_run(prepared: PreparedRun, audience: Audience) -> DryRunReport:
    rep = dry_run_stage.dry_run(engine_for(prepared.settings), prepared, audience)
    return with_line_quota(rep, None, run_logger())


@task(name="dispatch", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_transient, task_run_name="dispatch-{run_id}-pass-{index}")
def dispatch(settings, run_id: int, adapters, limiters, progress_id, index: int, *, config=None,
             records=None, resume: bool = False) -> DispatchOutcome:
    """One dispatcher pass; a poller moves the progress artifact while the pass sends."""
    engine = engine_for(settings)
    out: DispatchOutcome = _with_progress(
        engine, run_id, progress_id,
        lambda: dispatch_stage.dispatch_round(engine, run_id, adapters, config=config, limiters=limiters,
                                              records=records, resume=resume))
    run_logger().info("run %s pass %d: %d provider calls, outcomes %s, status %s%s", run_id, index, out.attempts,
                          dict(sorted(out.outcomes.items())), out.status,
                          f" ({out.stop_reason})" if out.stop_reason else "")
    return out


@task(name="dispatch-processes", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_transient, task_run_name="dispatch-{run_id}-pass-{index}-x{processes}")
def dispatch_processes(settings, run_id: int, channels: list[str], limiters, progress_id, index: int,
                       processes: int, *, config=None, resume: bool = False) -> DispatchOutcome:
    """One dispatcher pass made of ``processes`` dispatcher processes on the run (see membercare.delivery.pool)."""
    from membercare.delivery import pool

    engine = engine_for(settings)
    env = resolved_env()
    shared = [{"channel": str(Channel(ch).value), "name": lim.name, "limit": lim.chunk, "rate": lim.rate}
              for ch, lim in (limiters or {}).items() if hasattr(lim, "chunk")]
    if shared and not env.get("PREFECT_API_URL"):
        # The processes take their rate-limit slots from this flow's Prefect API (possibly the temporary
        # local server this process started).
        from prefect import get_client

        with get_client(sync_client=True) as client:
            env["PREFECT_API_URL"] = str(client.api_url)
    # Only shared limits need Prefect in the child; without them the core's own entry point starts in a fraction
    # of the time (importing Prefect costs each process seconds of CPU).
    child = "flows.dispatch_process" if shared else "membercare.delivery.pool"
    reports = _with_progress(
        engine, run_id, progress_id,
        lambda: pool.dispatch_processes(settings.db_url, run_id, processes, env=env, config=config, channels=channels,
                                        resume=resume, shared_limits=shared, child_module=child))
    m = pool.merge_reports(reports)
    due = datetime.fromisoformat(m["next_due_at"]) if m["next_due_at"] else None
    out = DispatchOutcome(run_id, m["attempts"], m["outcomes"], m["status"], m["stop_reason"], due,
                          m["recovered_unknown"], m["elapsed"])
    run_logger().info("run %s pass %d (%d processes): %d provider calls, outcomes %s, status %s%s", run_id, index,
                      processes, out.attempts, dict(sorted(out.outcomes.items())), out.status,
                      f" ({out.stop_reason})" if out.stop_reason else "")
    return out


def _with_progress(engine, run_id: int, progress_id, work: Callable[[], Any]) -> Any:
    """``work()`` in a worker thread while this task thread moves the run's progress artifact every second;
    its result, or its exception re-raised here (so the task's retry policy sees it)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["out"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task thread below
            result["exc"] = exc

    worker = threading.Thread(target=target, name=f"membercare-dispatch-{run_id}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(1.0)
        if progress_id is not None:
            _update_progress(engine, run_id, progress_id)
    if "exc" in result:
        raise result["exc"]
    return result["out"]


def _update_progress(engine, run_id: int, progress_id) -> None:
    from prefect.artifacts import update_progress_artifact

    done, total = dispatch_stage.run_progress(engine, run_id)
    try:
        update_progress_artifact(progress_id, 100.0 * done / total if total else 100.0)
    except Exception:  # noqa: BLE001 - progress is cosmetic; never fail a send over it
        pass


@task(name="test-send", cache_policy=NO_CACHE)
def test_send(settings, env: dict[str, str], campaign: str, to: str, member: str | None) -> list[SeedMessage]:
    """``membercare campaign test``: the campaign to a seed list, marked as a test, never in the ledger."""
    from channels.registry import close_channels
    from membercare.campaigns.seed_send import plan_test, send_test

    engine = engine_for(settings) if member is not None else None
    planned = plan_test(settings, campaign, to, engine=engine, member=member)
    adapters = build_adapters(env, planned.channels) if planned.channels else {}
    try:
        return send_test(settings, planned.campaign, planned.seeds, adapters, engine=engine,
                         member_id=planned.member_id)
    finally:
        close_channels(adapters)


def publish_test_send(campaign: str, sent: list[SeedMessage]) -> None:
    """The test send's artifact: one row per message (channel, locale, variant, seed number, outcome; never the
    seed's address)."""
    create_table_artifact([{"channel": s.channel, "locale": s.locale, "variant": s.variant or "-", "seed": s.seed,
                            "outcome": s.outcome, "headline": s.headline} for s in sent],
                          key=artifact_key(campaign, "test-send"),
                          description=f"{campaign}: test send, {accepted_count(sent)} of {len(sent)} accepted "
                                      "(marked [TEST]; not in the ledger, caps or reports)")


@task(name="summarise", cache_policy=NO_CACHE)
def summarise(prepared: PreparedRun, run_id: int | None, audience_size: int, newly_planned: int,
              sent_since: datetime) -> RunSummary:
    return summary_stage.summarise(engine_for(prepared.settings), run_id, campaign=prepared.name,
                                   occurrence=prepared.occurrence, segment_size=audience_size,
                                   newly_planned=newly_planned, sent_since=sent_since)


# ------------------------------------------------------------------------------------------------ helpers


def build_adapters(env: dict[str, str], channels):
    """Adapters for the channels a run may use; a channel without credentials stops the run now, loudly."""
    from channels.registry import build_channels

    try:
        return build_channels(env, channels=[Channel(c) for c in channels])
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (set it in the environment or run `membercare setup-blocks`)") from None


def with_line_quota(rep: DryRunReport, env: Mapping[str, str] | None, logger: Any) -> DryRunReport:
    """The dry run checked against LINE's monthly quota (read through the LINE adapter, with ``env`` or else
    the resolved environment, Secret blocks included) when it would send on LINE; a quota that would be
    exceeded, or could not be read, is logged as a warning."""
    from channels.registry import build_channels, close_channels

    def read_quota():
        built = build_channels(dict(resolved_env() if env is None else env), channels=[Channel.LINE])
        try:
            return built[Channel.LINE].quota()  # type: ignore[attr-defined]
        finally:
            close_channels(built)

    rep = dry_run_stage.with_line_quota(rep, read_quota)
    if rep.line_quota is not None and (rep.line_quota.exceeded or rep.line_quota.error):
        logger.warning("%s/%s: %s", rep.campaign, rep.occurrence, rep.line_quota.line())
    return rep


def limiters_for(channels, logger) -> dict:
    from flows.ratelimits import shared_limiters

    try:
        found, missing = shared_limiters(channels)
    except Exception as exc:  # noqa: BLE001 - no API (plain local run): the dispatcher's own limits apply
        logger.warning("cannot read global concurrency limits (%s): this worker's own rate limits apply",
                       type(exc).__name__)
        return {}
    rates = configured_rates(resolved_env(use_blocks=False))
    for ch in missing:
        logger.warning("no global concurrency limit membercare-%s: %s is limited to %g/s by this worker alone "
                       "(MEMBERCARE_RATE_LIMIT_%s; share it between workers with `membercare setup-blocks`)",
                       ch, ch, rates[ch], ch.upper())
    return found


def local_rate_config(adapters, limiters) -> DispatchConfig:
    """The dispatcher's own rate limits for the channels that no shared (global) limit covers: the operator's
    ``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` or the documented default, never unlimited."""
    rates = configured_rates(resolved_env(use_blocks=False))
    shared = {str(Channel(c).value) for c in (limiters or {})}
    used = {str(Channel(c).value) for c in adapters}
    return DispatchConfig(rate_limits={ch: rate for ch, rate in rates.items() if ch in used and ch not in shared})


def dispatch_until_settled(settings, run_id: int, adapters, limiters, *, dispatchers: int, wait_for_deferred_s: float,
                           progress_id=None, records=None, max_passes: int = 20,
                           resume: bool = False) -> DispatchOutcome:
    """Dispatcher passes until nothing is due within ``wait_for_deferred_s`` (quiet hours wait for later).

    ``dispatchers`` > 1: each pass is that many dispatcher processes (SQLite and PostgreSQL alike); their
    adapters are built from the flow's environment for the channels of ``adapters``, and ``records`` (a
    provider-records source for transactional resends) is not available to them.
    """
    total = DispatchOutcome(run_id)
    channels = sorted(str(Channel(c).value) for c in adapters)
    config = local_rate_config(adapters, limiters)
    for i in range(1, max_passes + 1):
        if dispatchers > 1:
            f = dispatch_processes.submit(settings, run_id, channels, quote(limiters), progress_id, i, dispatchers,
                                          config=quote(config), resume=resume and i == 1)
        else:
            f = dispatch.submit(settings, run_id, quote(adapters), quote(limiters), progress_id, i,
                                config=quote(config), records=quote(records), resume=resume and i == 1)
        total = total.merge(f.result())
        if total.stop_reason or total.next_due_at is None:
            break
        delay = (total.next_due_at - utcnow()).total_seconds()
        if delay > wait_for_deferred_s:
            break
        time.sleep(max(0.0, delay) + 0.05)
        total.next_due_at = None
    return total


def publish(summary: RunSummary, *, prepared: PreparedRun, audience: Audience,
            preview: str | None, dry: DryRunReport | None = None) -> None:
    """The run's table and markdown artifacts (counts and links only: no personal data)."""
    key = artifact_key(prepared.name, "dry-run" if summary.dry_run else "run")
    create_table_artifact(summary.table(), key=key,
                          description=f"{prepared.name} {prepared.occurrence}" + (" (dry run)" if summary.dry_run
                                                                                   else ""))
    lines = [f"# {prepared.name} · {prepared.occurrence}" + (" · dry run" if summary.dry_run else ""), "",
             f"*{prepared.campaign.description}*", "",
             f"- audience: {audience.source}: **{audience.size:,}** members ({len(audience):,} in this run)",
             f"- purpose: {prepared.campaign.purpose.value}, priority {prepared.campaign.priority}, channels "
             f"{', '.join(c.value for c in prepared.spec.channels)}, holdout {prepared.holdout_rate:.0%}",
             f"- status: **{summary.status}**"
             + (f" ({summary.status_reason})" if summary.status_reason else "")
             + f"; {'would send' if summary.dry_run else 'sent'} "
             f"**{summary.sent_total:,}** ({', '.join(f'{k} {v:,}' for k, v in sorted(summary.sent.items())) or '-'})",
             f"- deferred {summary.deferred:,}, suppressed {sum(summary.suppressed.values()):,}, skipped "
             f"{sum(summary.skipped.values()):,}, failed {sum(summary.failed.values()):,}"]
    if not summary.dry_run and summary.newly_planned == 0 and summary.planned:
        lines.append("- nothing new: every member of this occurrence was already planned by an earlier run")
    if dry is not None and dry.already_planned:
        lines.append(f"- {dry.already_planned:,} members already planned for this occurrence (would get nothing)")
    if dry is not None and dry.line_quota is not None:
        mark = "**" if dry.line_quota.exceeded else ""
        lines.append(f"- {mark}{dry.line_quota.line()}{mark}")
    if preview:
        lines += ["", f"[Rendered preview of the templates]({preview}) (sample members, preview-only links)"]
    create_markdown_artifact("\n".join(lines), key=artifact_key(prepared.name, "report"),
                             description=f"{prepared.name} {prepared.occurrence}")


# --------------------------------------------------------------------------------------------------- flow


@flow(name="run-campaign", flow_run_name=_flow_run_name, log_prints=False)
def run_campaign(params: CampaignRunParameters) -> dict[str, Any]:
    """Run one campaign occurrence: resolve, plan (in batch groups), dispatch, summarise."""
    logger = run_logger()
    started = utcnow()
    env = resolved_env()
    settings = settings_from(env)
    if params.test_to:
        tested = test_send(settings, env, params.campaign, params.test_to, params.test_member)
        publish_test_send(params.campaign, tested)
        ok = accepted_count(tested)
        logger.info("%s: test send, %d of %d test messages accepted; nothing else planned or sent", params.campaign,
                    ok, len(tested))
        if ok < len(tested):
            raise DeliveryError(f"{len(tested) - ok} of {len(tested)} test messages of {params.campaign} were "
                                "refused (see the test-send artifact)")
        return {"status": "test", "campaign": params.campaign, "accepted": ok, "messages": [vars(s) for s in tested]}
    options = params.options(settings.shop_timezone)
    occurrence_stage.refuse_future_as_of(options)
    prepared = without_unconfigured_channels(prepare(settings, params.campaign, options), env, logger)
    audience = resolve_segment(prepared)
    try:
        preview = preview_link(settings, dry_run_stage.write_preview(settings, prepared.name))
    except Exception as exc:  # noqa: BLE001 - the preview is a convenience for operators
        logger.warning("could not write the preview of %s: %s", prepared.name, exc)
        preview = None

    if params.dry_run:
        rep = dry_run(prepared, _quoted(audience))
        audience.release(engine_for(settings))
        summary = summary_stage.dry_run_summary(rep)
        publish(summary, prepared=prepared, audience=audience, preview=preview, dry=rep)
        logger.info("dry run %s", summary.line())
        # Samples stay in this process (the caller's terminal); they are never logged or put in artifacts.
        return {**_asdict(summary), "already_planned": rep.already_planned, "coupons_to_issue": rep.coupons_to_issue,
                "samples": [vars(s) for s in rep.samples],
                **({"line_quota": rep.line_quota.line(), "line_quota_exceeded": rep.line_quota.exceeded}
                   if rep.line_quota else {})}

    _refuse_cancelled_occurrence(settings, prepared)  # before asking for an approval it could never use
    if needs_approval(settings, prepared, dry_run=False):
        rep = dry_run(prepared, _quoted(audience))
        shown = summary_stage.dry_run_summary(rep)
        publish(shown, prepared=prepared, audience=audience, preview=preview, dry=rep)
        decision = wait_for_approval(settings, prepared, summary_line=shown.line(),
                                     timeout_s=params.approval_timeout_s)
        if not decision.approved:
            audience.release(engine_for(settings))
            logger.warning("%s/%s: nothing sent (%s)", prepared.name, prepared.occurrence, decision.line())
            return {**_asdict(shown), "status": "rejected", "status_reason": decision.line(),
                    "approval": decision.line()}
    adapters = build_adapters(env, prepared.spec.channels)
    try:
        run_id = plan_stage.ensure_run(engine_for(settings), prepared)
        _refuse_cancelled(settings, run_id)
        planned = PlanOutcome(run_id)
        for i, group in enumerate(audience.groups(params.group_size), 1):
            planned = planned.merge(plan(prepared, _quoted(group), i))
        audience.release(engine_for(settings))
        plan_stage.announce_planned(prepared, planned, audience.size)
        progress_id = create_progress_artifact(0.0, key=artifact_key(prepared.name, "progress"),
                                               description=f"{prepared.name} {prepared.occurrence}: dispatch")
        limiters = limiters_for(prepared.spec.channels, logger)
        if params.fan_out:
            from flows.dispatch import fan_out_dispatch

            sent = fan_out_dispatch(settings, run_id, [c.value for c in prepared.spec.channels], params.fan_out,
                                    wait_for_deferred_s=params.wait_for_deferred_s, resume=params.resume,
                                    on_poll=lambda: _update_progress(engine_for(settings), run_id, progress_id))
        else:
            sent = dispatch_until_settled(settings, run_id, adapters, limiters, dispatchers=params.dispatchers,
                                          wait_for_deferred_s=params.wait_for_deferred_s, progress_id=progress_id,
                                          resume=params.resume)
        _update_progress(engine_for(settings), run_id, progress_id)
    finally:
        from channels.registry import close_channels

        close_channels(adapters)
    summary = summarise(prepared, run_id, audience.size, planned.inserted, started)
    publish(summary, prepared=prepared, audience=audience, preview=preview)
    logger.info("%s", summary.line())
    if sent.stop_reason:
        logger.warning("run %s stopped: %s", run_id, sent.stop_reason)
    return _asdict(summary)


def without_unconfigured_channels(prepared: PreparedRun, env: Mapping[str, str], logger: Any) -> PreparedRun:
    """The run without the channels whose provider this shop has not set up (see
    :func:`channels.registry.unconfigured_channels`); members route to their next channel. A campaign left with
    no channel keeps them all, and building its adapters then names the missing variable."""
    from channels.registry import unconfigured_channels

    missing = unconfigured_channels(prepared.spec.channels, env)
    keep = tuple(c for c in prepared.spec.channels if c not in missing)
    if not missing or not keep:
        return prepared
    logger.warning("%s: %s not set up (no provider credentials), so this run uses %s", prepared.name,
                   ", ".join(c.value for c in missing), ", ".join(c.value for c in keep))
    return dataclasses.replace(prepared, spec=dataclasses.replace(prepared.spec, channels=keep))


def _quoted(value: Any) -> Any:
    """``quote(value)``: Prefect passes it to the task as is (no traversal of large inputs). Typed ``Any`` because
    a task's signature names the value's own type, which a ``quote`` wrapper is not."""
    return quote(value)


def _refuse_cancelled(settings, run_id: int) -> None:
    """An occurrence an operator cancelled is never planned or sent again (resume included)."""
    from membercare.delivery.controls import find_run

    info = find_run(engine_for(settings), run_id)
    if info.cancelled:
        raise InputError(f"{info.label} was cancelled ({info.reason}); it is never sent again")


def _refuse_cancelled_occurrence(settings, prepared: PreparedRun) -> None:
    from membercare.delivery.controls import find_run
    from membercare.errors import UnknownNameError

    try:
        info = find_run(engine_for(settings), f"{prepared.name}/{prepared.occurrence}")
    except UnknownNameError:
        return
    if info.cancelled:
        raise InputError(f"{info.label} was cancelled ({info.reason}); it is never sent again")


def _asdict(summary: RunSummary) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(summary)


__all__ = ["CampaignRunParameters", "run_campaign", "dispatch_until_settled", "dispatch_processes", "build_adapters",
           "limiters_for"]
