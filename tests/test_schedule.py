"""``campaign run NAME --as-of FUTURE --schedule``: a scheduled flow run of the campaign's deployment at that
moment, with the right parameters, and nothing sent now; refused clearly without a server or a deployment."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from clirun import run_cli
from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.errors import ConfigurationError
from membercare.timeutil import utcnow


@pytest.mark.slow  # four CLI processes
def test_without_a_prefect_server_schedule_is_refused_and_nothing_runs(tmp_path, sqlite_url):
    future = (utcnow() + timedelta(days=3)).replace(microsecond=0).isoformat()
    env = {"MEMBERCARE_DATABASE_URL": sqlite_url}
    r = run_cli("campaign", "run", "birthday", "--as-of", future, "--schedule", home=tmp_path, env=env)
    assert r.returncode == 1 and "--schedule needs a Prefect server" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("campaign", "run", "birthday", "--schedule", home=tmp_path, env=env)
    assert r.returncode == 2 and "--as-of" in r.stderr
    past = (utcnow() - timedelta(days=1)).replace(microsecond=0).isoformat()
    r = run_cli("campaign", "run", "birthday", "--as-of", past, "--schedule", home=tmp_path, env=env)
    assert r.returncode == 2 and "not in the future" in r.stderr
    r = run_cli("campaign", "run", "birthday", "--as-of", future, home=tmp_path, env=env)
    assert r.returncode == 2 and "--schedule" in r.stderr  # the refusal names the way to do it
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(CampaignRun.__table__)).scalar_one() == 0
    engine.dispose()


@pytest.mark.prefect
def test_schedule_creates_one_scheduled_run_of_the_deployment_and_sends_nothing(prefect_harness, sqlite_url,
                                                                               monkeypatch):
    from prefect import get_client

    from flows.campaign import CampaignRunParameters, run_campaign
    from membercare.cli.schedule import schedule_campaign_run

    monkeypatch.setenv("MEMBERCARE_DATABASE_URL", sqlite_url)
    dep_id = run_campaign.to_deployment(name="birthday-sched", parameters={
        "params": {"campaign": "birthday", "holdout_rate": 0.2, "segment_params": {"x": 1}}}).apply()
    at = (utcnow() + timedelta(days=3)).replace(microsecond=0)
    params = CampaignRunParameters(campaign="birthday", as_of=at.isoformat(), limit=50)
    fr, name = schedule_campaign_run(params, at)
    again, _ = schedule_campaign_run(params, at)
    assert name == "birthday-sched" and again.id == fr.id  # the same command twice: one flow run
    with get_client(sync_client=True) as client:
        got = client.read_flow_run(fr.id)
    assert got.deployment_id == dep_id and got.state is not None and got.state.is_scheduled()
    assert got.state.state_details.scheduled_time == at
    assert got.parameters == {"params": {"campaign": "birthday", "as_of": at.isoformat(), "limit": 50,
                                         "holdout_rate": 0.2, "segment_params": {"x": 1}}}
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        for table in (CampaignRun.__table__, OutboxMessage.__table__):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0
    engine.dispose()
    with pytest.raises(ConfigurationError, match="no run-campaign deployment runs campaign vip_appreciation"):
        schedule_campaign_run(CampaignRunParameters(campaign="vip_appreciation", as_of=at.isoformat()), at)
