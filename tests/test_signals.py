"""Signals: the core's operational events, forwarded to Prefect by the flows layer (flows/signals.py)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import yaml

from membercare import signals

ROOT = Path(__file__).resolve().parents[1]


def test_a_signal_carries_scalars_only_and_cuts_long_text():
    s = signals.Signal(signals.RUN_PAUSED, signals.run_resource(7), {"reason": "x" * 500, "failed": 3})
    assert s.payload == {"reason": "x" * 200, "failed": 3}
    with pytest.raises(TypeError, match="'member' must be a scalar"):
        signals.Signal(signals.RUN_PAUSED, "membercare.run.7", {"member": {"email": "a@example.com"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="start with 'membercare.'"):
        signals.Signal("run.paused", "membercare.run.7")


def test_signals_reach_the_installed_sink_and_a_failing_sink_never_fails_the_work(caplog):
    sink = signals.MemorySink()
    with signals.installed(sink):
        signals.emit(signals.CAMPAIGN_PLANNED, signals.run_resource(1), {"planned": 10},
                     related=(signals.campaign_resource("welcome"),))
    signals.emit(signals.CAMPAIGN_PLANNED, signals.run_resource(2))  # after the block: not this sink's
    assert [(s.resource, dict(s.payload), s.related) for s in sink.named(signals.CAMPAIGN_PLANNED)] == [
        ("membercare.run.1", {"planned": 10}, ("membercare.campaign.welcome",))]

    class Broken:
        def emit(self, signal):
            raise ConnectionError("the API is down")

    with signals.installed(Broken()), caplog.at_level(logging.WARNING, "membercare.signals"):
        signals.emit(signals.RUN_PAUSED, signals.run_resource(3), {"reason": "error budget spent"})
    assert "could not emit signal membercare.run.paused for membercare.run.3 (ConnectionError)" in caplog.text


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "automations").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_example_automations_are_valid_prefect_automations(path):
    from prefect.events.schemas.automations import AutomationCore

    automation = AutomationCore.model_validate(yaml.safe_load(path.read_text()))
    assert automation.actions and automation.trigger


def test_flows_forward_signals_to_prefect_events(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    import flows  # noqa: F401 - importing the flows layer installs the Prefect sink
    from flows.signals import PrefectSignalSink

    @flow(name="signal-smoke")
    def pause_a_run() -> None:
        signals.emit(signals.RUN_PAUSED, signals.run_resource(4242), {"reason": "error budget spent", "failed": 51},
                     related=(signals.campaign_resource("churn_winback"),))

    with signals.installed(PrefectSignalSink()):
        state = pause_a_run(return_state=True)
    assert state.is_completed()
    EventsWorker.drain_all()
    wanted = EventFilter(event=EventNameFilter(name=[signals.RUN_PAUSED]),
                         resource=EventResourceFilter(id=["membercare.run.4242"]))
    events = []
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60  # the server persists events in the background
        while not events and time.monotonic() < deadline:
            events = client.read_events(filter=wanted, limit=50).events  # the server refuses its default of 100
            if not events:
                time.sleep(0.5)
    assert len(events) == 1
    event = events[0]
    assert event.payload == {"reason": "error budget spent", "failed": 51}
    roles = {r.role: r.id for r in event.related}
    assert roles["campaign"] == "membercare.campaign.churn_winback"
    assert roles["flow-run"].startswith("prefect.flow-run.")  # Prefect related the run that emitted it


def test_a_members_own_opt_out_is_signalled_once_when_it_commits(engine, clock):
    from fakes import seed_members
    from membercare.consent import ConsentStatement, record_consents

    with engine.begin() as conn:
        a, b = seed_members(conn, 2, now=clock())
    link = ConsentStatement(a, "email", "marketing", False, "unsubscribe_link", clock())
    sink = signals.MemorySink()
    with signals.installed(sink):
        with pytest.raises(RuntimeError), engine.begin() as conn:
            record_consents(conn, [link])
            raise RuntimeError("rolled back")
        assert sink.signals == []  # nothing is announced for a rollback
        with engine.begin() as conn:  # an import changes many members at once: no signal per member
            record_consents(conn, [link, ConsentStatement(b, "sms", "marketing", False, "import", clock())])
        with engine.begin() as conn:  # a webhook retry repeats the statement: already recorded, not new
            record_consents(conn, [link])
    assert [(s.resource, dict(s.payload)) for s in sink.named(signals.MEMBER_UNSUBSCRIBED)] == [
        (f"membercare.member.{a}", {"channel": "email", "purpose": "marketing", "source": "unsubscribe_link"})]


def test_a_provider_spending_the_error_budget_signals_a_pause_and_an_outage(engine, clock):
    from fakes import FakeAdapter, seed_members, simple_renderer
    from membercare.delivery.contract import TransientFailure
    from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
    from membercare.delivery.planner import PlanSpec, plan_run
    from membercare.delivery.policies import PolicySettings
    from membercare.models import Channel, Purpose

    nopolicy = PolicySettings(marketing_cap=None, quiet_hours=None)
    with engine.begin() as conn:
        ids = seed_members(conn, 120, preferred="sms,email", consent=[("sms", "marketing"), ("email", "marketing")],
                           now=clock())
    run_id = plan_run(engine, PlanSpec("outage", "2026-11-23", Purpose.MARKETING, (Channel.SMS, Channel.EMAIL)),
                      [ids], clock(), simple_renderer, policy=nopolicy).run_id
    down = {"sms": FakeAdapter("sms", lambda m, n: TransientFailure("503 from the provider", status=503)),
            "email": FakeAdapter("email")}
    cfg = DispatchConfig(workers=4, batch_size=40, error_min_samples=20, backoff_base=60.0, flush_interval=0.02)
    sink = signals.MemorySink()
    with signals.installed(sink):
        rep = Dispatcher(engine, down, config=cfg, policy=nopolicy, clock=clock).dispatch(run_id)
    assert rep.stop_reason.startswith("error budget spent")
    paused, = sink.named(signals.RUN_PAUSED)
    assert paused.resource == f"membercare.run.{run_id}" and paused.payload["cause"] == "error_budget"
    outage, = sink.named(signals.PROVIDER_OUTAGE)
    assert outage.payload["channel"] == "sms" and outage.payload["failed"] >= 20 // 2
    dispatched, = sink.named(signals.CAMPAIGN_DISPATCHED)
    assert dispatched.payload["status"] == "paused" and dispatched.payload["attempts"] == rep.attempts
