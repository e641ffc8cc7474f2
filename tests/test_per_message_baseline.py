"""The per-message baseline flow (bench/per_message_baseline.py): the naive one-task-per-message Prefect
implementation the benchmark compares against. It must really send, through the real SDKs and the sandbox,
exactly once per member, and its measurement wrapper must report failures instead of crashing.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from membercare.delivery.models import OutboxMessage, decode_contents
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import env_for

OB = OutboxMessage.__table__
AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
CAMPAIGN = "churn_winback"  # email, push and SMS, with an offer coupon issued per member
SECRET = "baseline-test-secret-" + "q" * 24


def _routable_members(url: str, n: int, channels: tuple[str, ...] = ("email", "sms", "push"),
                      held_out: bool = False) -> list[int]:
    """``n`` members of a generated shop whose first consented, reachable channel is one of ``channels``, outside
    the campaign's holdout (inside it with ``held_out``)."""
    from membercare.campaigns import load_campaign
    from membercare.campaigns.occurrence import holdout_rate_for
    from membercare.config import Settings
    from membercare.db import make_engine
    from membercare.delivery.routing import candidate_order, load_contexts, route
    from membercare.models import Member
    from membercare.optimise.assignment import in_holdout

    camp = load_campaign(CAMPAIGN, Settings())
    engine = make_engine(url)
    with engine.connect() as conn:
        ids = list(conn.execute(sa.select(Member.__table__.c.id).order_by(Member.__table__.c.id)).scalars())
        ctxs = load_contexts(conn, ids, "marketing", AS_OF, timedelta(days=60))
    engine.dispose()
    out = []
    for mid in ids:
        order, not_allowed = candidate_order(ctxs[mid].preferred, [c.value for c in camp.channels])
        chain = route(ctxs[mid], order, "marketing", not_allowed).chain
        if chain and chain[0] in channels and in_holdout(mid, CAMPAIGN, holdout_rate_for(camp)) == held_out:
            out.append(mid)
    assert len(out) >= n, "the generated shop has too few reachable members"
    return out[:n]


def _generate(url: str) -> str:
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine

    engine = make_engine(url)
    # The shop's history ends at AS_OF, the instant its audience and routing are evaluated at: generated at
    # the real clock, it would drift past AS_OF as the calendar moves on.
    generate_shop(engine, members=120, seed=3, as_of=AS_OF)
    engine.dispose()
    return url


@pytest.fixture
def shop_url(db_url) -> str:
    return _generate(db_url)


@pytest.fixture
def baseline_env(monkeypatch, shop_url, sandbox, service_account, tmp_path):
    env = {**env_for(sandbox, service_account), "MEMBERCARE_DATABASE_URL": shop_url,
           "MEMBERCARE_HOME": str(tmp_path / "home"), "MEMBERCARE_SECRET_KEY": SECRET,
           "MEMBERCARE_NO_SECRET_BLOCKS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env
    from bench.per_message_baseline import close_shared

    close_shared()  # SDK clients and engines belong to this test's sandbox and database


# ------------------------------------------------------------------------------------------------ pure parts


def test_union_of_task_body_intervals():
    from bench.per_message_baseline import _union_seconds

    assert _union_seconds([], 0, 10) == 0
    assert _union_seconds([(1, 3), (2, 4), (6, 7)], 0, 10) == pytest.approx(4)
    assert _union_seconds([(-5, 2), (9, 20)], 0, 10) == pytest.approx(3)  # clipped to the flow's wall time
    assert _union_seconds([(1, 9), (2, 3), (4, 5)], 0, 10) == pytest.approx(8)


def test_result_has_the_fields_the_benchmark_reads():
    from bench.per_message_baseline import BaselineResult

    d = BaselineResult(messages=3, sent=2, failed=1, error="1 task runs failed").to_dict()
    for key in ("messages", "sent", "failed", "seconds", "messages_per_s", "task_runs", "peak_rss_mb",
                "prefect_seconds", "error"):
        assert key in d
    assert BaselineResult.from_dict({**d, "unknown_field": 1}) == BaselineResult(**d)


def test_run_baseline_rejects_bad_sizes():
    from bench.per_message_baseline import run_baseline
    from membercare.errors import InputError

    with pytest.raises(InputError, match="n_messages"):
        run_baseline(0, env={}, campaign=CAMPAIGN, as_of=AS_OF)


def test_timeout_is_a_result_not_a_crash(tmp_path, sqlite_url):
    from bench.per_message_baseline import run_baseline

    env = {"MEMBERCARE_DATABASE_URL": sqlite_url, "MEMBERCARE_HOME": str(tmp_path / "home")}
    res = run_baseline(5, env=env, campaign=CAMPAIGN, as_of=AS_OF, member_ids=[1, 2, 3], timeout_s=0.3)
    assert res.error == "timed out after 0.3 s"
    assert res.messages == 3 and res.sent == 0 and res.task_runs == 0


def test_audience_is_the_segment_or_the_given_members_cut_to_the_limit(baseline_env, shop_url):
    from bench.per_message_baseline import load_audience
    from membercare.campaigns.audience import resolve_audience
    from membercare.campaigns.occurrence import RunOptions, prepare
    from membercare.config import Settings
    from membercare.db import make_engine

    settings = Settings.from_env(baseline_env)
    prepared = prepare(settings, CAMPAIGN, RunOptions(as_of=AS_OF), check=False)
    engine = make_engine(shop_url)
    segment = [e.member_id for e in resolve_audience(engine, prepared).entries]
    engine.dispose()
    assert segment, "the generated shop should have churn-risk members"
    assert load_audience.fn(CAMPAIGN, AS_OF) == segment
    assert load_audience.fn(CAMPAIGN, AS_OF, limit=2) == segment[:2]
    assert load_audience.fn(CAMPAIGN, AS_OF, [5, 3, 9, 3], limit=2) == [5, 3]


# ---------------------------------------------------------------------------------------------------- flow


@pytest.mark.slow  # the benchmark's baseline flow under the Prefect harness, on both backends
@pytest.mark.prefect
def test_one_task_run_per_message_each_member_gets_exactly_one_and_a_rerun_sends_nothing(
        baseline_env, prefect_harness, sandbox, shop_url):
    from bench.per_message_baseline import _count_task_runs, per_message_baseline
    from membercare.db import make_engine

    ids = _routable_members(shop_url, 20)
    state = per_message_baseline(CAMPAIGN, AS_OF, ids, return_state=True)
    summary = state.result()
    assert summary == {"messages": 20, "outcomes": {"sent": 20}, "errors": {}}

    # Every member got exactly one message at the sandbox, through the real SDKs.
    records = sandbox.messages()
    assert len(records) == 20 and sandbox.stats()["duplicates_by_message_id_total"] == 0
    by_member = Counter(int(r["idempotency_key"].split("|")[2]) for r in records)
    assert by_member == Counter(ids)
    assert {r["channel"] for r in records} <= {"email", "sms", "push"}

    # One task run per message (plus the audience task), all completed.
    n, states, retries = _count_task_runs(state.state_details.flow_run_id, expected=21)
    assert n == 21 and states == {"completed": 21} and retries == 0

    # The ledger records each send with the provider's id.
    engine = make_engine(shop_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(OB.c.member_id, OB.c.state, OB.c.provider_message_id, OB.c.message_id)
                            .where(OB.c.campaign == CAMPAIGN)).all()
    engine.dispose()
    assert sorted(r.member_id for r in rows) == sorted(ids) and {r.state for r in rows} == {"sent"}
    assert {r.provider_message_id for r in rows} == {rec["provider_id"] for rec in records}
    assert {r.message_id for r in rows} == {rec["message_id"] for rec in records}

    # Like a campaign run, every channel of the routed chain was rendered and stored with the row.
    with engine.connect() as conn:
        stored = conn.execute(sa.select(OB.c.channel, OB.c.fallback_channels, OB.c.content)
                              .where(OB.c.campaign == CAMPAIGN)).all()
    engine.dispose()
    for row in stored:
        assert set(decode_contents(row.content)) == {row.channel, *filter(None, row.fallback_channels.split(","))}

    # A rerun checks the ledger first and sends nothing more.
    again = per_message_baseline(CAMPAIGN, AS_OF, ids)
    assert again["outcomes"] == {"already_sent": 20}
    assert sandbox.stats()["accepted_total"] == 20

    # Members in the campaign's holdout get a skipped row and no message, as in a campaign run.
    held = _routable_members(shop_url, 2, held_out=True)
    out = per_message_baseline(CAMPAIGN, AS_OF, held)
    assert out["outcomes"] == {"skipped": 2} and sandbox.stats()["accepted_total"] == 20
    with engine.connect() as conn:
        codes = conn.execute(sa.select(OB.c.reason_code).where(OB.c.member_id.in_(held),
                                                               OB.c.campaign == CAMPAIGN)).scalars().all()
    engine.dispose()
    assert codes == ["holdout", "holdout"]


@pytest.mark.slow
@pytest.mark.prefect
def test_failed_sends_are_counted_not_raised(baseline_env, prefect_harness, sandbox, shop_url):
    from bench.per_message_baseline import _count_task_runs, per_message_baseline

    # (not push: firebase-admin retries 5xx itself for seconds)
    ids = _routable_members(shop_url, 4, channels=("email", "sms"))
    sandbox.configure(email={"error_rate": 1.0}, sms={"error_rate": 1.0})
    state = per_message_baseline(CAMPAIGN, AS_OF, ids, occurrence_tag="failing", return_state=True)
    out = state.result()
    assert out["messages"] == 4 and out["outcomes"] == {"failed": 4}
    assert sum(out["errors"].values()) == 4 and all("SendFailed" in e for e in out["errors"])
    # retries=2: three attempts per message, each one a provider call
    n, states, retries = _count_task_runs(state.state_details.flow_run_id, expected=5)
    assert n == 5 and states == {"completed": 1, "failed": 4} and retries == 8
    assert sandbox.stats()["accepted_total"] == 0 and sum(sandbox.stats()["requests"].values()) == 12


@pytest.mark.slow
def test_run_baseline_measures_a_run_in_a_subprocess(sqlite_url, sandbox, service_account, tmp_path):
    """The benchmark's entry point: a fresh process with its own ephemeral Prefect server (SQLite only)."""
    from bench.per_message_baseline import run_baseline

    shop_url = _generate(sqlite_url)
    ids = _routable_members(shop_url, 5)
    env = {**env_for(sandbox, service_account), "MEMBERCARE_DATABASE_URL": shop_url,
           "MEMBERCARE_HOME": str(tmp_path / "home"), "MEMBERCARE_SECRET_KEY": SECRET,
           "MEMBERCARE_NO_SECRET_BLOCKS": "1"}
    res = run_baseline(5, env=env, campaign=CAMPAIGN, as_of=AS_OF, member_ids=ids, timeout_s=240)
    assert res.error is None, res.error
    assert (res.messages, res.sent, res.failed, res.task_runs) == (5, 5, 0, 6)
    assert res.seconds > 0 and res.messages_per_s > 0 and res.peak_rss_mb > 50
    assert 0 <= res.prefect_seconds <= res.seconds
    assert sandbox.stats()["accepted_total"] == 5
