"""``trigger-message``: event-triggered messages for one member (order delivered, bad review, ...).

The event names come from the campaigns' ``trigger:`` (``membercare.campaigns.triggers.trigger_events``). Each campaign
the event starts runs as a ``run-campaign`` subflow with an explicit one-member audience, so it gets the same
stages, policies, artifacts and exactly-once key as a scheduled run. A campaign whose delay has not passed
yet (post-purchase care: seven days after delivery) is not sent now: the daily sweep of that campaign sends
it on its due date under the same occurrence key (so never twice).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.campaign import CampaignRunParameters, run_campaign
from flows.common import engine_for, resolved_env, run_logger, settings_from
from membercare.campaigns.triggers import plan_trigger
from membercare.timeutil import parse_as_of, utcnow


@flow(name="trigger-message", log_prints=False)
def trigger_message(event: str, member: str, order: str | None = None, ref: str | None = None,
                    at: str | None = None) -> list[dict[str, Any]]:
    """Run the campaigns ``event`` starts for ``member`` (external id or database id)."""
    logger = run_logger()
    settings = settings_from(resolved_env())
    when = parse_as_of(at, settings.shop_timezone) if at else None
    plans = plan_trigger(engine_for(settings), settings, event, member, order=order, ref=ref, at=when)
    results = []
    now = utcnow()
    for tr in plans:
        if tr.expired:
            logger.warning("%s for member id %d skipped: %s", tr.campaign, tr.member_id, tr.expired)
            results.append({"campaign": tr.campaign, "status": "skipped", "reason": tr.expired})
            continue
        if tr.due_at > now:
            logger.info("%s for member id %d is due %s: the daily run sends it then", tr.campaign, tr.member_id,
                        tr.due_at.isoformat())
            results.append({"campaign": tr.campaign, "status": "due later", "due_at": tr.due_at.isoformat()})
            continue
        o = tr.options
        params = CampaignRunParameters(
            campaign=tr.campaign, as_of=o.as_of.isoformat() if o.as_of else None, members=list(o.members or ()),
            order_ref=o.order_ref, event_ref=o.event_ref,
            occurrence_at=o.occurrence_at.isoformat() if o.occurrence_at else None)
        summary = run_campaign(params)
        results.append({"campaign": tr.campaign, "status": summary["status"], "sent": sum(summary["sent"].values()),
                        "newly_planned": summary["newly_planned"]})
    return results
