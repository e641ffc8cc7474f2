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
