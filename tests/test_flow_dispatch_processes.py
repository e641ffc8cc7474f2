"""``run-campaign`` with ``dispatchers=2``: the dispatch pass runs as two dispatcher processes (one per core)
against the shop database and the sandbox, sends each message once, and a rerun sends nothing."""

from __future__ import annotations

import pytest

import test_flows
from sandbox_fixtures import *  # noqa: F403

pytestmark = [pytest.mark.prefect, pytest.mark.slow]  # two dispatcher processes under a Prefect flow
# The flow tests' fixtures, bound here so that pytest finds them in this module.
flow_env, shop_db = test_flows.flow_env, test_flows.shop_db


def test_run_campaign_with_two_dispatcher_processes_sends_once(flow_env, prefect_harness, sandbox):
    from flows.campaign import CampaignRunParameters, run_campaign

    params = CampaignRunParameters(campaign="coupon_expiry", limit=40, segment_params={"days": 14},
                                   as_of=test_flows.SHOP_DAY.isoformat(),
                                   occurrence_tag="procs", wait_for_deferred_s=0, dispatchers=2)
    first = run_campaign(params)
    accepted = sandbox.stats()["accepted_total"]
    assert first["newly_planned"] == 40
    assert accepted == first["sent_now"] == sum(first["sent"].values()) > 0
    assert first["waiting"] == 0  # nothing left planned or sending (quiet hours may defer some: "deferred")
    again = run_campaign(params)
    assert again["newly_planned"] == 0 and again["sent_now"] == 0
    stats = sandbox.stats()
    assert stats["accepted_total"] == accepted
    assert stats["duplicates_by_idempotency_key_total"] == stats["duplicates_by_message_id_total"] == 0
