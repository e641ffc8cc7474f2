"""Approval in the Prefect UI: a campaign with ``approval: required`` publishes its dry run, waits paused for
an approve/reject form, and sends only when approved; who decided and when is recorded; rejected sends nothing."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import sqlalchemy as sa

from membercare.config import default_templates_dir
from membercare.data.generator import default_as_of
from membercare.delivery.controls import find_run
from membercare.delivery.models import OutboxMessage
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for

pytestmark = [pytest.mark.prefect]
OB = OutboxMessage.__table__
SHOP_DAY = default_as_of()


@pytest.fixture
def approval_env(monkeypatch, sandbox, service_account, tmp_path):
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine, upgrade

    templates = tmp_path / "templates"
    shutil.copytree(default_templates_dir(), templates)
    yaml = templates / "vip_appreciation" / "campaign.yaml"
    yaml.write_text(yaml.read_text(encoding="utf-8") + "\napproval: required\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'membercare.db'}"
    upgrade(url)
    engine = make_engine(url)
    generate_shop(engine, members=600, seed=5, as_of=SHOP_DAY)
    env = {**env_for(sandbox, service_account), "MEMBERCARE_DATABASE_URL": url, "MEMBERCARE_TEMPLATES_DIR":
           str(templates), "MEMBERCARE_HOME": str(tmp_path / "home"), "MEMBERCARE_SECRET_KEY": "a" * 40,
           "MEMBERCARE_NO_SECRET_BLOCKS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield engine
    engine.dispose()


def _paused_flow_run(timeout: float = 120.0):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
        if runs:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError("the flow never paused for approval")


def _run_in_thread(params):
    from flows.campaign import run_campaign

    out: dict = {}

    def target():
        try:
            out["result"] = run_campaign(params)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _rows(engine, occurrence):
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(OB).where(OB.c.occurrence == occurrence)
                            ).scalar_one()


def test_approved_sends_rejected_sends_nothing_and_the_decision_is_recorded(approval_env, prefect_harness, sandbox):
    from prefect.flow_runs import resume_flow_run

    from flows.campaign import CampaignRunParameters, run_campaign

    engine = approval_env
    as_of = SHOP_DAY.isoformat()
    # Rejected: nothing planned or sent, the occurrence is cancelled for good.
    t, out = _run_in_thread(CampaignRunParameters(campaign="vip_appreciation", as_of=as_of, occurrence_tag="no",
                                                  wait_for_deferred_s=0))
    fr = _paused_flow_run()
    info = find_run(engine, "vip_appreciation")
    assert info.status == "paused" and "awaiting approval" in (info.reason or "") and not info.counts
    assert sandbox.stats()["accepted_total"] == 0
    resume_flow_run(fr.id, run_input={"approve": False, "approver": "mei", "comment": "wrong month"})
    t.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["status"] == "rejected" and "rejected by mei" in out["result"]["approval"]
    run = find_run(engine, info.id)
    assert run.cancelled and "rejected in the Prefect UI: wrong month" in (run.reason or "")
    assert sandbox.stats()["accepted_total"] == 0 and _rows(engine, run.occurrence) == 0
    # A rerun of the rejected occurrence is refused at once, without asking for an approval again.
    with pytest.raises(Exception, match="it is never sent again"):
        run_campaign(CampaignRunParameters(campaign="vip_appreciation", as_of=as_of, occurrence_tag="no",
                                           wait_for_deferred_s=0))

    # Approved: planned and sent after the decision; who and when recorded.
    t, out = _run_in_thread(CampaignRunParameters(campaign="vip_appreciation", as_of=as_of, occurrence_tag="ok",
                                                  wait_for_deferred_s=0))
    fr = _paused_flow_run()
    assert sandbox.stats()["accepted_total"] == 0
    resume_flow_run(fr.id, run_input={"approve": True, "approver": "lin", "comment": "looks good"})
    t.join(180)
    assert "error" not in out, out.get("error")
    res = out["result"]
    assert res["newly_planned"] > 0 and sandbox.stats()["accepted_total"] == res["sent_now"] > 0

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["vip-appreciation-approval"])))
    texts = " ".join(a.data for a in arts)
    assert "approved" in texts and "lin" in texts and "looks good" in texts
    assert "rejected" in texts and "mei" in texts
