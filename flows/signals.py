"""Signals from the core become Prefect events, so that automations in the Prefect UI can react to them.

:mod:`membercare.signals` is the core's side (names, the payload rules, the sink interface); this module
is the sink. ``import flows`` installs it, so every process that runs our flows forwards signals; Prefect
adds the flow run and deployment as related resources by itself. ``deploy/automations/`` holds example
automations (notify when a run pauses; start the care message deployment on an order event).

A process with no Prefect server configured (``PREFECT_API_URL`` unset) and no flow or task run under
way only logs its signals: emitting there would start an ephemeral API server just to drop the event.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL

from membercare import signals

log = logging.getLogger("membercare.flows")


class PrefectSignalSink:
    """Forwards each :class:`membercare.signals.Signal` with ``prefect.events.emit_event`` (buffered by
    Prefect's events worker, so emitting does not wait for the API)."""

    def emit(self, signal: signals.Signal) -> None:
        if PREFECT_API_URL.value() is None and FlowRunContext.get() is None and TaskRunContext.get() is None:
            log.debug("signal %s for %s (no Prefect API to send it to)", signal.name, signal.resource)
            return
        related = [{"prefect.resource.id": r, "prefect.resource.role": r.split(".")[1]} for r in signal.related]
        emit_event(event=signal.name, resource={"prefect.resource.id": signal.resource},
                   related=related or None, payload=dict(signal.payload))


def forward_to_prefect() -> None:
    """Install the Prefect sink for this process."""
    signals.install(PrefectSignalSink())
