"""``run-campaign`` with ``test_to``: the deployment's test send is the same as ``membercare campaign test --to``
(every channel, locale and variant, marked [TEST], never in the ledger) and sends nothing else."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.models import Coupon
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for

pytestmark = [pytest.mark.prefect]


@pytest.fixture
def flow_env(monkeypatch, sandbox, service_account, tmp_path, sqlite_url):
    from membercare.db import make_engine

    engine = make_engine(sqlite_url)
    quiet = {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in ("email", "sms", "push")}
    sandbox.configure(engagement=quiet)
    env = {**env_for(sandbox, service_account), "MEMBERCARE_DATABASE_URL": sqlite_url,
           "MEMBERCARE_HOME": str(tmp_path / "home"), "MEMBERCARE_SECRET_KEY": "a" * 40,
           "MEMBERCARE_NO_SECRET_BLOCKS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # A named seed list in the project folder (the deployments' working directory).
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "team.txt").write_text("# the marketing team\nqa@example.com\n+886912345678\n",
                                                 encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    yield engine
    engine.dispose()


def _ledger(engine):
    with engine.connect() as conn:
        return [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (OutboxMessage.__table__, CampaignRun.__table__, Coupon.__table__)]


def test_test_to_sends_the_test_and_nothing_else(flow_env, prefect_harness, sandbox):
    from prefect import get_client

    from flows.campaign import CampaignRunParameters, run_campaign

    engine = flow_env
    before = _ledger(engine)
    # As a deployment passes it: a plain dict of parameters.
    params = CampaignRunParameters.model_validate({"campaign": "churn_winback", "test_to": "team"})
    out = run_campaign(params)
    # churn_winback: email and sms seeds (no push seed) x 2 locales x 2 variants.
    assert out["status"] == "test" and out["accepted"] == 8 == len(out["messages"])
    assert {(m["channel"], m["locale"], m["variant"]) for m in out["messages"]} == {
        (c, loc, v) for c in ("email", "sms") for loc in ("zh-TW", "en") for v in ("a", "b")}
    records = sandbox.messages()
    assert len(records) == 8 and all(r["message_id"].startswith("test") for r in records)
    assert _ledger(engine) == before  # no run, outbox row or coupon: caps, reports and optimisation never see it

    with get_client(sync_client=True) as client:
        art = client.read_latest_artifacts()
    table = [a for a in art if a.key == "churn-winback-test-send"]
    assert table and "8 of 8 accepted" in (table[0].description or "")
    assert "qa@example.com" not in str(table[0].data) and "912345678" not in str(table[0].data)


def test_an_unknown_seed_list_fails_before_anything_is_sent(flow_env, prefect_harness, sandbox):
    from flows.campaign import CampaignRunParameters, run_campaign

    with pytest.raises(Exception, match="no seed list named 'nobody'"):
        run_campaign(CampaignRunParameters(campaign="churn_winback", test_to="nobody"))
    assert sandbox.messages() == []
