"""The decision log in planning (outbox policy/propensity columns, migration 0015_propensity) and causal send-hour
learning from it (membercare.optimise.causal_history), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import pickle
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from membercare.campaigns import Optimise
from membercare.campaigns.audience import resolve_audience
from membercare.campaigns.occurrence import RunOptions, prepare
from membercare.campaigns.plan import make_plan_hooks, plan_group
from membercare.config import Settings
from membercare.delivery.models import CampaignRun, OutboxMessage
from membercare.delivery.planner import Recipient
from membercare.delivery.routing import load_contexts
from membercare.engagement.models import EngagementEventRow
from membercare.models import Member
from membercare.optimise import causal_history, send_time
from membercare.optimise import history as opt_history
from membercare.optimise import hooks as plan_hooks

AS_OF = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 10:00 Asia/Taipei
OB, R, E, M = OutboxMessage.__table__, CampaignRun.__table__, EngagementEventRow.__table__, Member.__table__


@pytest.fixture(autouse=True)
def _fresh_cache():
    opt_history.clear_cache()
    yield
    opt_history.clear_cache()


@pytest.fixture
def shop(engine):
    from membercare.data.generator import generate_shop

    generate_shop(engine, members=300, seed=11, as_of=AS_OF - timedelta(hours=10))
    return engine


def _settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", secret_key="test-secret-key-" + "x" * 24)


def _plan(shop, tmp_path, optimise: Optimise | None, n: int = 300):
    settings = _settings(tmp_path)
    with shop.connect() as conn:
        ids = tuple(conn.execute(sa.select(M.c.id).order_by(M.c.id).limit(n)).scalars())
    prepared = prepare(settings, "vip_appreciation", RunOptions(as_of=AS_OF, members=ids), check=False)
    if optimise is not None:
        camp = prepared.campaign.model_copy(update={"optimise": optimise})
        prepared = prepare(settings, camp, RunOptions(as_of=AS_OF, members=ids), check=False)
    hooks = make_plan_hooks(shop, prepared)
    plan_group(shop, prepared, resolve_audience(shop, prepared).entries)
    with shop.connect() as conn:
        rows = conn.execute(sa.select(OB, M.c.timezone).join(M, M.c.id == OB.c.member_id)
                            .where(OB.c.campaign == "vip_appreciation")).all()
    return hooks, rows


def _routed(rows):
    return [r for r in rows if r.state in ("planned", "deferred")]


def test_exploring_campaign_logs_every_decision_with_its_probability(shop, tmp_path):
    hooks, rows = _plan(shop, tmp_path, Optimise(routing="best_engagement", send_time="causal_hour", explore=0.3))
    assert isinstance(hooks.prefer, plan_hooks.BestEngagement)
    assert isinstance(hooks.deliver_at, plan_hooks.CausalHour)
    clone = pickle.loads(pickle.dumps(hooks))  # the planning pool sends hooks to worker processes
    assert clone.deliver_at.policy_label == hooks.deliver_at.policy_label and clone.prefer.explore == 0.3
    routed = _routed(rows)
    assert len(routed) > 100, Counter(r.reason_code for r in rows)
    explored_hours = 0
    for r in routed:
        assert r.policy == "best_engagement/explore=0.3/v1+causal_hour/explore=0.3/v1"
        assert r.chosen_channel == r.channel
        assert 0 < r.channel_propensity <= 1 and 0 < r.hour_propensity <= 1
        due = r.next_attempt_at or AS_OF
        assert due.astimezone(send_time.ZoneInfo(r.timezone)).hour == r.send_hour
        assert 9 <= r.send_hour < 21  # quiet hours 21:00-09:00 by default
        explored_hours += r.hour_propensity < 0.5
    # 30 % explored among 12 hours: about 27.5 % of rows took a non-greedy hour (0.3 * 11/12).
    assert 0.15 < explored_hours / len(routed) < 0.40
    # Probabilities are those of epsilon-greedy: eps/K or 1 - eps + eps/K.
    assert {round(r.hour_propensity, 6) for r in routed} == {round(0.3 / 12, 6), round(0.7 + 0.3 / 12, 6)}
    # Holdout rows carry no decision.
    assert all(r.policy is None for r in rows if r.reason_code == "holdout")


def test_default_campaign_logs_deterministic_decisions(shop, tmp_path):
    hooks, rows = _plan(shop, tmp_path, None, n=60)
    assert hooks.prefer is None and hooks.deliver_at is None
    routed = _routed(rows)
    assert routed
    for r in routed:
        assert r.policy == "preference+now"
        assert r.channel_propensity == 1.0 and r.hour_propensity == 1.0
        assert r.chosen_channel == r.channel


def test_thompson_routing_logs_integrated_probabilities(shop, tmp_path):
    _, rows = _plan(shop, tmp_path, Optimise(routing="best_engagement"), n=120)
    routed = _routed(rows)
    assert routed and all(r.policy.startswith("best_engagement_thompson/explore=0/v1+now") for r in routed)
    assert all(0 < r.channel_propensity <= 1 for r in routed)
    assert any(r.channel_propensity < 0.999 for r in routed)  # members with two channels and little history


def test_explored_choices_are_stable_per_member(shop, tmp_path):
    """``routing: preference`` and ``send_time: immediate`` with exploration: the hooks are seeded per campaign,
    occurrence and member, so asking again (a re-plan) gives the same channel, hour and probabilities."""
    hooks, rows = _plan(shop, tmp_path, Optimise(explore=0.5), n=120)
    assert isinstance(hooks.prefer, plan_hooks.ExploreChannel) and isinstance(hooks.deliver_at, plan_hooks.ExploreHour)
    routed = _routed(rows)
    assert {r.policy for r in routed} == {"preference/explore=0.5/v1+now/explore=0.5/v1"}
    with shop.connect() as conn:
        ctxs = load_contexts(conn, [r.member_id for r in routed], "marketing", AS_OF, timedelta(days=60))
    for r in routed:
        ctx = ctxs[r.member_id]
        order = hooks.prefer(ctx, Recipient(r.member_id))
        at = hooks.deliver_at(ctx, Recipient(r.member_id), r.channel) or AS_OF
        assert hooks.deliver_at.propensity(r.member_id, r.send_hour) == pytest.approx(r.hour_propensity)
        assert at.astimezone(send_time.ZoneInfo(r.timezone)).hour == r.send_hour
        assert hooks.prefer.propensity(r.member_id, r.chosen_channel) == pytest.approx(r.channel_propensity)
        if order is not None:  # None: fewer than two routable channels, the member's own order (probability 1)
            assert order[0] == r.chosen_channel
            assert hooks.prefer.propensity(r.member_id, r.chosen_channel) == pytest.approx(r.channel_propensity)
    # Members with two routable channels were explored about half the time (0.5 * 1/2 on the other channel).
    two = [r for r in routed if r.channel_propensity < 1]
    assert two and 0.1 < sum(r.channel_propensity < 0.5 for r in two) / len(two) < 0.45


def _add_sent(conn, run, member_id, *, hour_utc: int, p: float, clicked: bool, day: int):
    mid = uuid.uuid4().hex
    at = (AS_OF - timedelta(days=day)).replace(hour=hour_utc)
    conn.execute(OB.insert().values(
        message_id=mid, run_id=run, campaign="c", occurrence=f"o{day}", member_id=member_id,
        idempotency_key=f"c|o{day}|{member_id}|{mid[:6]}", purpose="marketing", priority=50, channel="email",
        fallback_channels="", state="sent", reason_code="routed", reason="t", attempts=1, transient_failures=0,
        scheduled_at=at, sent_at=at, created_at=at, updated_at=at, policy="p", chosen_channel="email",
        channel_propensity=1.0, send_hour=(hour_utc + 8) % 24, hour_propensity=p))
    if clicked:
        conn.execute(E.insert().values(provider="test", provider_event_id=uuid.uuid4().hex, kind="clicked",
                                       channel="email", message_id=mid, member_id=member_id,
                                       occurred_at=at + timedelta(minutes=5), received_at=at, raw="{}"))


def test_send_hour_rates_weight_by_inverse_propensity(shop):
    """The shop mostly sends at 10:00 local (p = 0.9 + 0.1/12) and explores 19:00 rarely (p = 0.1/12). Raw click
    counts favour 10:00; the weighted rates find 19:00, whose messages engage three times as often."""
    with shop.begin() as conn:
        run = conn.execute(R.insert().values(
            campaign="c", occurrence="o", purpose="marketing", priority=50, as_of=AS_OF, status="completed",
            error_budget=0.5, counts="{}", created_at=AS_OF, updated_at=AS_OF).returning(R.c.id)).scalar_one()
        ids = list(conn.execute(sa.select(M.c.id).where(M.c.age_group.is_not(None)).limit(100)).scalars())
        greedy, rare = 0.9 + 0.1 / 12, 0.1 / 12
        for day in range(1, 11):
            for i, mid in enumerate(ids):
                _add_sent(conn, run, mid, hour_utc=2, p=greedy, clicked=(i + day) % 10 == 0, day=day)  # 10 %
            for i, mid in enumerate(ids[:12]):
                _add_sent(conn, run, mid, hour_utc=11, p=rare, clicked=(i + day) % 10 < 3, day=day)  # 30 %
    with shop.connect() as conn:
        rates = causal_history.load_send_hour_rates(conn, AS_OF, min_weight=100.0)
        raw = Counter(h for h, in conn.execute(sa.select(OB.c.send_hour).join(E, E.c.message_id == OB.c.message_id)))
    assert raw.most_common(1)[0][0] == 10
    assert rates.best[-1] == 19
    assert rates.hour_for("no-such-group", None) == 19
    with shop.connect() as conn:
        strict = causal_history.load_send_hour_rates(conn, AS_OF, min_weight=1e12)
    assert strict.best[-1] == send_time.DEFAULT_HOUR  # too little evidence: the default hour


def _plant_exploration_log(engine, n_days: int = 25, members: int = 100, seed: int = 4, eps: float = 0.3) -> None:
    """A shop that sends at 10:00 local with ``eps`` exploration over 9..20; messages sent at 19:00 engage 30 % of
    the time, all others 10 %."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with engine.begin() as conn:
        run = conn.execute(R.insert().values(
            campaign="c", occurrence="o", purpose="marketing", priority=50, as_of=AS_OF, status="completed",
            error_budget=0.5, counts="{}", created_at=AS_OF, updated_at=AS_OF).returning(R.c.id)).scalar_one()
        ids = list(conn.execute(sa.select(M.c.id).order_by(M.c.id).limit(members)).scalars())
        for day in range(1, n_days + 1):
            for mid in ids:
                local = int(rng.integers(9, 21)) if rng.random() < eps else 10
                p = eps / 12 + (1 - eps if local == 10 else 0.0)
                clicked = rng.random() < (0.30 if local == 19 else 0.10)
                _add_sent(conn, run, mid, hour_utc=(local - 8) % 24, p=p, clicked=clicked, day=day)


def test_offpolicy_evaluation_from_the_decision_log(shop):
    from membercare.optimise import offpolicy_logs

    _plant_exploration_log(shop)
    with shop.connect() as conn:
        log = offpolicy_logs.load_decision_log(conn, AS_OF - timedelta(days=30), AS_OF)
    assert log.n == 2500 and log.skipped == 0
    logged = offpolicy_logs.evaluate_candidate(log)
    assert logged["ips"].value == pytest.approx(log.reward.mean())  # the logging policy itself: weights 1
    at19 = offpolicy_logs.evaluate_candidate(log, hour_rule="fixed", hour=19)
    at10 = offpolicy_logs.evaluate_candidate(log, hour_rule="fixed", hour=10)
    for est, truth in ((at19, 0.30), (at10, 0.10)):
        for e in est.values():
            assert abs(e.value - truth) < 3.5 * e.se, (e.estimator, e.value, e.ci)
    assert at19["ips"].effective_n < 0.05 * log.n  # few explored rows back the 19:00 estimate
    usual = offpolicy_logs.evaluate_candidate(log, hour_rule="usual")
    assert usual["snips"].value == pytest.approx(at10["snips"].value)
    best = offpolicy_logs.evaluate_candidate(log, hour_rule="best-time")  # cross-fitted
    assert best["dr"].value > at10["dr"].ci[1]


def test_optimise_evaluate_cli(tmp_path):
    from clirun import run_cli
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine

    home = tmp_path / "home"
    assert run_cli("db", "upgrade", home=home).returncode == 0
    engine = make_engine(Settings(home=home, secret_key="x" * 40).db_url)
    generate_shop(engine, members=60, seed=3, as_of=AS_OF - timedelta(days=40))
    _plant_exploration_log(engine, n_days=10, members=60)
    engine.dispose()
    res = run_cli("optimise", "evaluate", "--as-of", AS_OF.isoformat(), "--days", "30", "--hour-rule", "logged",
                  "--hour-rule", "fixed", "--hour", "19", "--json", home=home)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rows"] == 600
    assert set(out["candidates"]) == {"logged channel, logged hour", "logged channel, fixed hour 19:00"}
    assert set(out["candidates"]["logged channel, logged hour"]) == {"ips", "snips", "dr"}
    empty = run_cli("optimise", "evaluate", "--as-of", "2020-01-01", home=home)
    assert empty.returncode != 0 and "no sent marketing message with a logged decision" in empty.stderr


def test_channel_rates_from_explored_sends_replace_the_routed_group_rates(shop):
    """A group routed to SMS 95 % of the time (explored to email 5 %): email messages engage 30 %, SMS 12 %. The
    weighted group rates rank email first and become best_engagement's group prior."""
    import numpy as np

    from membercare.delivery.routing import CHANNELS

    rng = np.random.default_rng(1)
    with shop.begin() as conn:
        run = conn.execute(R.insert().values(
            campaign="c", occurrence="o", purpose="marketing", priority=50, as_of=AS_OF, status="completed",
            error_budget=0.5, counts="{}", created_at=AS_OF, updated_at=AS_OF).returning(R.c.id)).scalar_one()
        row = conn.execute(sa.select(M.c.age_group, M.c.tier).where(M.c.age_group.is_not(None)).limit(1)).one()
        ids = list(conn.execute(sa.select(M.c.id).where(M.c.age_group == row.age_group, M.c.tier == row.tier)
                                .limit(60)).scalars())
        for day in range(1, 31):
            for mid in ids:
                email = rng.random() < 0.05
                at = AS_OF - timedelta(days=day)
                msg = uuid.uuid4().hex
                ch = "email" if email else "sms"
                conn.execute(OB.insert().values(
                    message_id=msg, run_id=run, campaign="c", occurrence=f"o{day}", member_id=mid,
                    idempotency_key=f"c|o{day}|{mid}", purpose="marketing", priority=50, channel=ch,
                    fallback_channels="", state="sent", reason_code="routed", reason="t", attempts=1,
                    transient_failures=0, scheduled_at=at, sent_at=at, created_at=at, updated_at=at, policy="p",
                    chosen_channel=ch, channel_propensity=0.05 if email else 0.95, send_hour=10, hour_propensity=1.0))
                if rng.random() < (0.30 if email else 0.12):
                    conn.execute(E.insert().values(provider="test", provider_event_id=uuid.uuid4().hex,
                                                   kind="clicked", channel=ch, message_id=msg, member_id=mid,
                                                   occurred_at=at, received_at=at, raw="{}"))
    with shop.connect() as conn:
        rates = causal_history.load_channel_rates(conn, AS_OF)
    key = opt_history.group_key(row.age_group, row.tier)
    assert key in rates
    r = dict(zip(CHANNELS, rates[key], strict=True))
    assert r["email"] > r["sms"] + 0.08
    hook = plan_hooks.BestEngagement(opt_history.cached_channel_history(shop, AS_OF), campaign="x", occurrence="1",
                                     purpose="marketing", allowed=("email", "sms"), explore=0.1,
                                     causal_rates=rates)
    assert hook._group_rates[key][CHANNELS.index("email")] == pytest.approx(r["email"])
