"""Starting deployments from outside Prefect: the Prefect side of :class:`membercare.receiver.triggers.TriggerStarter`.

The receiver validates ``POST /triggers/{event}`` and hands the flow's parameters to a starter; this one creates
a run of the ``trigger-message`` deployment (``prefect.yaml``) and returns at once (``timeout=0``): a worker of
the deployment's pool runs it. ``membercare serve`` wires it into the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass

TRIGGER_DEPLOYMENT = "trigger-message/trigger-message"


@dataclass(frozen=True)
class DeploymentStarter:
    """Creates a flow run of ``deployment`` (``flow-name/deployment-name``) and returns the run's id.

    Raises whatever Prefect raises when the API is unreachable or the deployment does not exist; the receiver
    turns that into a 503.
    """

    deployment: str = TRIGGER_DEPLOYMENT

    def __call__(self, parameters: dict[str, str]) -> str:
        # Imported on the first trigger, not at start-up: importing Prefect costs seconds and most receivers
        # only take webhooks.
        from prefect.deployments import run_deployment

        run = run_deployment(self.deployment, parameters=parameters, timeout=0)
        return str(run.id)  # type: ignore[union-attr]  # sync context: run_deployment returns the FlowRun
