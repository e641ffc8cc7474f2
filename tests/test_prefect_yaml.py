"""prefect.yaml, the campaign calendar: every deployment's entrypoint imports, its parameters validate
against the flow signature, its schedules are valid cron expressions in a valid time zone, and the
campaign deployments name real campaigns (whose segment parameters exist)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
DEPLOYMENTS = SPEC["deployments"]


def load_flow(entrypoint: str):
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_names_are_unique_and_expected_jobs_are_scheduled():
    names = [d["name"] for d in DEPLOYMENTS]
    assert len(names) == len(set(names))
    for required in ("birthday", "coupon-expiry-3d", "coupon-expiry-1d", "welcome-day0", "welcome-day3", "welcome-day7",
                     "vip-appreciation", "churn-winback", "tier-review", "post-purchase-care", "recommendations",
                     "score-members", "sync-engagement", "dispatch-due", "trigger-message"):
        assert required in names


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_is_valid(dep):
    from prefect.client.schemas.schedules import CronSchedule

    flow = load_flow(dep["entrypoint"])
    params = dep.get("parameters") or {}
    sig = inspect.signature(flow.fn)
    assert set(params) <= set(sig.parameters), f"unknown parameters {set(params) - set(sig.parameters)}"
    if dep.get("schedules"):
        # A scheduled run gets nothing but these parameters: they must be complete and valid.
        flow.validate_parameters(params)
        assert dep.get("concurrency_limit") == 1
    for sched in dep.get("schedules") or []:
        assert sched["timezone"] == "Asia/Taipei"
        CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # raises on a bad cron or zone
    assert dep["work_pool"]["name"] == "membercare"
    text = yaml.safe_dump(dep).lower()
    assert "api_key" not in text and "auth_token" not in text and "secret" not in text


@pytest.mark.parametrize("dep", [d for d in DEPLOYMENTS if d["entrypoint"].endswith(":run_campaign")],
                         ids=lambda d: d["name"])
def test_campaign_deployments_name_real_campaigns(dep):
    from membercare.campaigns.occurrence import RunOptions, prepare
    from membercare.config import Settings
    from segments.base import ref

    p = dep["parameters"]["params"]
    prepared = prepare(Settings(), p["campaign"], RunOptions(
        segment_params=p.get("segment_params", {}), occurrence_tag=p.get("occurrence_tag")), check=False)
    if prepared.campaign.segment is not None:
        ref(prepared.campaign.segment.name, **prepared.segment_params)  # unknown parameters raise


def test_coupon_expiry_reminders_do_not_share_an_occurrence():
    tags = {d["parameters"]["params"].get("occurrence_tag") for d in DEPLOYMENTS
            if d.get("parameters", {}).get("params", {}).get("campaign") == "coupon_expiry"}
    assert tags == {"d3", "d1"}


def test_the_test_send_deployment_sends_a_test_to_a_seed_list_that_exists():
    from flows.campaign import CampaignRunParameters
    from membercare.campaigns.seed_send import parse_seeds

    dep = next(d for d in DEPLOYMENTS if d["name"] == "campaign-test-send")
    assert not dep.get("schedules")
    params = CampaignRunParameters.model_validate(dep["parameters"]["params"])
    assert params.test_to and parse_seeds(params.test_to, lists_dir=Path(__file__).resolve().parent.parent)
