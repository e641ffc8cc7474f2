"""The ``advance-journeys`` flow under Prefect's test harness: it advances due instances, sends what their steps
planned through the sandbox (in the same run, or in the next one when planned with send=False), publishes its counts
as an artifact, and a further run sends nothing again."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from journey_helpers import OB, SECRET, members, send_event, settings_for
from membercare.db import make_engine
from membercare.timeutil import utcnow
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for

pytestmark = [pytest.mark.prefect]


def test_advance_journeys_flow_sends_once_and_publishes_counts(prefect_harness, sandbox, service_account, sqlite_url,
                                                               tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.journeys import advance_journeys

    env = {**env_for(sandbox, service_account), "MEMBERCARE_DATABASE_URL": sqlite_url,
           "MEMBERCARE_HOME": str(tmp_path / "home"), "MEMBERCARE_SECRET_KEY": SECRET}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # The flow runs on the real clock (a scheduled run's "now"): the carts were left two hours ago.
    engine = make_engine(sqlite_url)
    settings = settings_for(tmp_path)
    left = utcnow() - timedelta(hours=2)
    ids = members(engine, 3, left, journey="abandoned_cart", settings=settings)
    for mid in ids:
        send_event(engine, settings, "cart.updated", mid, left, f"cart-{mid}")
    # At an earlier instant (as_of, the demo's simulated clock) the hour is not over: they start waiting.
    early = advance_journeys(as_of=left + timedelta(minutes=30))
    assert early["claimed"] == 3 and early["steps"] == {} and early["sent"] == 0
    out = advance_journeys(send=False)  # plan only (as the demo's past stops do)
    assert out["sends"] == {"planned": 3} and out["sent"] == 0 and not sandbox.messages("email")
    assert out["steps"] == {"wait:waited": 3, "send:planned": 3}  # the hour was over: the email
    # The next run advances nothing but dispatches the journey rows still due.
    later = advance_journeys()
    assert later["claimed"] == 0 and later["sent"] == 3
    assert len(sandbox.messages("email")) == 3
    again = advance_journeys()
    assert again["claimed"] == 0 and again["sent"] == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(OB)).scalar() == 3
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["advance-journeys"])))
    assert arts and any("instances advanced" in str(a.data) for a in arts)
    engine.dispose()
