"""``score-members``: the nightly RFM scores, churn model and tier review (each a task, each idempotent).

RFM and churn scores are snapshots keyed by the shop-local date, so a rerun for the same day replaces
them; the tier review applies only the changes due at ``as_of`` and finds nothing to do the second time.
Segments read the newest snapshot, so campaigns of the day should run after this flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import engine_for, resolved_env, retry_transient, run_logger, settings_from
from membercare.timeutil import parse_as_of


@task(name="score-rfm", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def score_rfm(settings, as_of) -> dict[str, Any]:
    from segments.rfm import score_rfm as _score

    with engine_for(settings).begin() as conn:
        run = _score(conn, as_of, shop_timezone=settings.shop_timezone)
    run_logger().info("RFM %s: %d members scored", run.as_of_date, run.scored)
    return {"rfm scored": run.scored, **{f"rfm {k}": v for k, v in run.cells.items()}}


@task(name="score-churn", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def score_churn(settings, as_of, horizon_days: int) -> dict[str, Any]:
    from segments.churn_scoring import score_churn as _score

    with engine_for(settings).begin() as conn:
        run = _score(conn, as_of, shop_timezone=settings.shop_timezone, horizon_days=horizon_days)
    fields = {k: getattr(run, k) for k in ("scored", "distinct_rows", "at_risk")}
    run_logger().info("churn model fitted and scored: %s", fields)
    return {f"churn {k}": v for k, v in fields.items()}


@task(name="review-tiers", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def review_tiers(settings, as_of, apply: bool) -> dict[str, Any]:
    from collections import Counter

    from membercare import tiers

    with engine_for(settings).begin() as conn:
        changes = list(tiers.review(conn, as_of))
        if apply and changes:
            tiers.apply(conn, changes, as_of)
    kinds = Counter(c.reason for c in changes)
    run_logger().info("tier review: %d changes (%s)%s", len(changes), dict(kinds), "" if apply else " not applied")
    return {"tier changes": len(changes), **{f"tier {k}": v for k, v in sorted(kinds.items())}}


@flow(name="score-members", log_prints=False)
def score_members(as_of: str | None = None, churn_horizon_days: int = 30, apply_tiers: bool = True) -> dict[str, Any]:
    """Nightly scoring: RFM, BG/NBD churn, tier upgrades/renewals/downgrades."""
    settings = settings_from(resolved_env())
    when = parse_as_of(as_of, settings.shop_timezone)
    out: dict[str, Any] = {}
    out.update(score_rfm(settings, when))
    out.update(score_churn(settings, when, churn_horizon_days))
    out.update(review_tiers(settings, when, apply_tiers))
    create_table_artifact([{"metric": k, "value": v} for k, v in out.items()], key="score-members",
                          description=f"scoring as of {when.isoformat()}")
    return out
