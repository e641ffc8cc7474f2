"""``POST /triggers/{event}`` hands accepted triggers to a :class:`TriggerStarter`; the Prefect one lives in flows/.

The receiver side runs with plain callables (no Prefect); :class:`flows.deployments.DeploymentStarter` is checked
against the session's Prefect test server with a real deployment of the ``trigger-message`` flow.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from channels.fcm.webhooks import SIGNATURE_HEADER, sign_push_tracking
from membercare.config import Settings
from membercare.models import Member
from membercare.receiver.triggers import TriggerConfig, build_trigger_router

SECRET = "trigger-secret"
AS_OF = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=30, seed=5, as_of=AS_OF - timedelta(hours=10))
    return engine


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def client_for(engine, settings, starter) -> TestClient:
    app = FastAPI()
    app.include_router(build_trigger_router(engine, TriggerConfig(secret=SECRET), settings, starter=starter))
    return TestClient(app)


def post(client: TestClient, event: str, payload) -> object:
    body = json.dumps(payload).encode()
    return client.post(f"/triggers/{event}", content=body, headers={SIGNATURE_HEADER: sign_push_tracking(SECRET, body)})


def a_member(engine) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.select(Member.__table__.c.external_id).order_by(Member.__table__.c.id).limit(1)).scalar()


def test_without_a_starter_the_endpoint_answers_503_but_still_refuses_bad_bodies(engine, settings):
    client = client_for(engine, settings, None)
    assert post(client, "review.negative", {"nobody": 1}).status_code == 400
    r = post(client, "review.negative", {"member": "M1"})
    assert r.status_code == 503 and r.json() == {"error": "no flow-run starter is configured"}


def test_a_failing_starter_is_a_503_with_a_log_line_that_names_no_member(shop, settings, caplog):
    member = a_member(shop)

    def unreachable(parameters):
        raise ConnectionError(f"orchestrator down while starting {parameters}")

    with caplog.at_level(logging.WARNING, logger="membercare.receiver.triggers"):
        r = post(client_for(shop, settings, unreachable), "review.negative", {"member": member, "ref": "R-77"})
    assert r.status_code == 503 and r.json() == {"error": "could not start the flow run; retry later"}
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "membercare.receiver.triggers"]
    assert lines == ["trigger review.negative: could not start the flow run (ConnectionError); answered 503"]
    assert member not in caplog.text and "R-77" not in caplog.text


def test_a_starter_raising_value_error_is_not_mistaken_for_a_bad_request(shop, settings):
    """Only validation maps to 4xx: whatever the starter raises means 'retry later'."""
    def broken(parameters):
        raise ValueError("deployment parameters rejected")

    assert post(client_for(shop, settings, broken), "review.negative", {"member": a_member(shop)}).status_code == 503


def test_validation_runs_before_the_starter_is_called(shop, settings):
    started = []
    client = client_for(shop, settings, lambda p: started.append(p) or "run-9")
    assert post(client, "no.such.event", {"member": a_member(shop)}).status_code == 404
    assert post(client, "review.negative", {"member": "M-NOPE"}).status_code == 422
    assert not started
    ok = post(client, "review.negative", {"member": a_member(shop), "ref": "R1"})
    assert ok.status_code == 202 and ok.json() == {"flow_run_id": "run-9", "event": "review.negative"}
    assert started == [{"event": "review.negative", "member": a_member(shop), "ref": "R1"}]


def test_deployment_starter_creates_a_run_of_the_trigger_message_deployment(prefect_harness):
    from prefect import get_client

    from flows.deployments import TRIGGER_DEPLOYMENT, DeploymentStarter
    from flows.triggers import trigger_message

    flow_name, deployment_name = TRIGGER_DEPLOYMENT.split("/")
    assert trigger_message.name == flow_name
    deployment_id = trigger_message.to_deployment(name=deployment_name).apply()

    params = {"event": "review.negative", "member": "M0000001", "ref": "R-5"}
    run_id = DeploymentStarter()(params)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
    assert run.deployment_id == deployment_id and run.parameters == params
    assert run.state is not None and run.state.is_scheduled()  # created for a worker, not run in this process

    with pytest.raises(Exception) as missing:
        DeploymentStarter("trigger-message/no-such-deployment")(params)
    assert "not found" in str(missing.value).lower() or type(missing.value).__name__ == "ObjectNotFound"
