"""``membercare campaign run NAME --as-of FUTURE --schedule``: a scheduled flow run of the campaign's deployment.

A real send for a future ``as_of`` is refused (it would select members for a day that has not come and send
to them now). ``--schedule`` instead asks the Prefect server to start the campaign's ``run-campaign``
deployment at that moment, with that ``as_of``: nothing is planned or sent now, the run is visible (and can be
cancelled) in the Prefect UI until then, and a worker of the deployment's pool runs it like a scheduled one.

It needs a Prefect server (``PREFECT_API_URL``: Prefect's local ephemeral mode keeps no server after the
command, so nothing would ever start the run) and a ``run-campaign`` deployment for the campaign
(``prefect.yaml``); without either it refuses and says which. The same command twice creates one flow run
(an idempotency key of campaign, tag and moment).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from membercare.errors import ConfigurationError, InputError
from membercare.timeutil import ensure_utc

FLOW_NAME = "run-campaign"


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def find_deployment(client: Any, campaign: str, tag: str | None) -> Any:
    """The ``run-campaign`` deployment whose parameters name ``campaign`` (and ``tag``, the occurrence tag)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
    mine = [d for d in found if ((d.parameters or {}).get("params") or {}).get("campaign") == campaign]
    match = [d for d in mine if ((d.parameters or {}).get("params") or {}).get("occurrence_tag") == tag]
    if len(match) == 1:
        return match[0]
    if not mine:
        raise ConfigurationError(f"no {FLOW_NAME} deployment runs campaign {campaign} on this Prefect server: "
                                 "add one to prefect.yaml and deploy it (docs/campaigns.md), then schedule again")
    names = ", ".join(sorted(f"{d.name} (tag {((d.parameters or {}).get('params') or {}).get('occurrence_tag')})"
                             for d in mine))
    raise InputError(f"campaign {campaign} has {'no' if not match else 'several'} deployment(s) for tag {tag}: "
                     f"{names}; give the deployment's --tag")


def schedule_campaign_run(params: Any, at: datetime) -> tuple[Any, str]:
    """Create a ``Scheduled`` flow run of the campaign's deployment at ``at`` with these run parameters (merged
    over the deployment's). Returns the flow run and the deployment's name."""
    from prefect import get_client
    from prefect.states import Scheduled

    if not _api_url():
        raise ConfigurationError("--schedule needs a Prefect server that keeps the run until then: set "
                                 "PREFECT_API_URL (`membercare ui` or `membercare stack` start one) and deploy the "
                                 "campaign's deployment (prefect.yaml); without one, run it on the day instead")
    at = ensure_utc(at)
    with get_client(sync_client=True) as client:
        deployment = find_deployment(client, params.campaign, params.occurrence_tag)
        base = dict((deployment.parameters or {}).get("params") or {})
        mine = params.model_dump(mode="json", exclude_defaults=True)
        merged = {**base, **mine, "as_of": at.isoformat(),
                  "segment_params": {**base.get("segment_params", {}), **mine.get("segment_params", {})}}
        checked = type(params).model_validate(merged)  # the run would refuse what does not validate: refuse now
        key = f"membercare-schedule|{params.campaign}|{params.occurrence_tag or ''}|{at.isoformat()}"
        fr = client.create_flow_run_from_deployment(
            deployment.id, parameters={"params": checked.model_dump(mode="json", exclude_defaults=True)},
            state=Scheduled(scheduled_time=at), tags=["scheduled-by-membercare"], idempotency_key=key)
    return fr, str(deployment.name)


__all__ = ["find_deployment", "schedule_campaign_run"]
