"""The run-campaign flow's dry run warns when the campaign's LINE messages would pass the month's remaining
LINE quota: in what it returns and in its markdown artifact (a generated shop whose members are linked to LINE,
the sandbox as LINE with a small quota, the real flow under the Prefect test harness)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from membercare.consent import ConsentStatement, record_consents
from membercare.data.generator import default_as_of
from membercare.models import Member
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for

pytestmark = [pytest.mark.prefect]
SECRET = "line-quota-flow-secret-" + "z" * 20
TOKEN = "line-quota-flow-access-token"
SHOP_DAY = default_as_of()


@pytest.fixture
def linked_shop(tmp_path) -> str:
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'membercare.db'}"
    upgrade(url)
    engine = make_engine(url)
    generate_shop(engine, members=300, seed=7, as_of=SHOP_DAY)
    m = Member.__table__
    with engine.begin() as c:
        ids = c.execute(sa.select(m.c.id)).scalars().all()
        for member_id in ids:
            c.execute(sa.update(m).where(m.c.id == member_id).values(
                line_user_id="U" + f"{member_id:032x}", preferred_channels="line,email,push"))
        record_consents(c, [ConsentStatement(i, "line", "marketing", True, "import", SHOP_DAY) for i in ids])
    engine.dispose()
    return url


def test_the_dry_run_flow_warns_when_line_would_pass_the_quota(prefect_harness, linked_shop, sandbox,
                                                                service_account, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.campaign import CampaignRunParameters, run_campaign

    env = {**env_for(sandbox, service_account), "MEMBERCARE_DATABASE_URL": linked_shop,
           "MEMBERCARE_HOME": str(tmp_path / "home"), "MEMBERCARE_SECRET_KEY": SECRET,
           "MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN": TOKEN, "MEMBERCARE_LINE_BASE_URL": sandbox.url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MEMBERCARE_NO_SECRET_BLOCKS", raising=False)
    sandbox.configure(line_access_tokens=[TOKEN], line_quota=3)

    dry = run_campaign(CampaignRunParameters(campaign="vip_appreciation", dry_run=True, limit=40,
                                             as_of=SHOP_DAY.isoformat()))
    line = dry["sent"].get("line", 0)
    assert line > 3 and sandbox.stats()["accepted_total"] == 0
    assert dry["line_quota_exceeded"] is True
    assert dry["line_quota"].startswith(f"WARNING LINE quota: {line:,} LINE messages would be sent but only 3 of 3")
    with get_client(sync_client=True) as client:
        # The newest version: other tests of the session's Prefect server publish this key too.
        (report,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["vip-appreciation-report"])), sort=ArtifactSort.CREATED_DESC, limit=1)
    assert f"**{dry['line_quota']}**" in report.data

    sandbox.configure(line_quota=10_000)
    fits = run_campaign(CampaignRunParameters(campaign="vip_appreciation", dry_run=True, limit=40,
                                              as_of=SHOP_DAY.isoformat(), occurrence_tag="again"))
    assert fits["line_quota_exceeded"] is False
    assert fits["line_quota"] == f"LINE quota: {line:,} of the 10,000 messages left this month"
