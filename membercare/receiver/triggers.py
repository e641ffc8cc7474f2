"""``POST /triggers/{event}``: the shop's systems start event-triggered messages for one member.

Body (JSON): ``{"member": "M0000042", "order": "O123" (optional), "ref": "R9" (optional), "at": ISO (optional)}``,
signed like the app's push reports: header ``X-Membercare-Signature: sha256=<hex HMAC-SHA256 of the raw
body>`` with ``MEMBERCARE_TRIGGER_SECRET``. Without the secret the endpoint answers 503.

The request is validated against the database (event, member, order) and answered ``202`` with the Prefect
flow run that will do the work: a run of the ``trigger-message`` deployment (``prefect.yaml``), picked up
by a worker. The receiver itself never sends, and never imports Prefect until a trigger arrives.

Mount it with ``app.include_router(build_trigger_router(engine, TriggerConfig.from_env(), settings))``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from channels.fcm_webhooks import SIGNATURE_HEADER, verify_push_tracking
from membercare.config import Settings
from membercare.errors import InputError, UnknownNameError

DEPLOYMENT = "trigger-message/trigger-message"
MAX_BODY = 16 * 1024

# start(parameters) -> flow run id; the default schedules a run of the trigger-message deployment.
Starter = Callable[[dict[str, Any]], str]


def prefect_starter(parameters: dict[str, Any]) -> str:
    """Create a flow run of the ``trigger-message`` deployment (a worker runs it) and return its id."""
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)
    return str(run.id)


@dataclass(frozen=True)
class TriggerConfig:
    secret: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TriggerConfig":
        env = os.environ if env is None else env
        return cls(secret=(env.get("MEMBERCARE_TRIGGER_SECRET") or "").strip() or None)


def build_trigger_router(engine: Engine, config: TriggerConfig, settings: Settings | None = None,
                         starter: Starter = prefect_starter) -> APIRouter:
    router = APIRouter()
    settings = settings or Settings.from_env()

    @router.post("/triggers/{event}")
    async def trigger(event: str, request: Request) -> JSONResponse:
        if not config.secret:
            return JSONResponse({"error": "MEMBERCARE_TRIGGER_SECRET is not configured"}, status_code=503)
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return JSONResponse({"error": "missing signature"}, status_code=401)
        if not verify_push_tracking(config.secret, body, signature):
            return JSONResponse({"error": "bad signature"}, status_code=403)
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or not isinstance(data.get("member"), (str, int)):
                raise ValueError
            params = {"event": event, "member": str(data["member"]),
                      **{k: str(data[k]) for k in ("order", "ref", "at") if data.get(k) is not None}}
        except ValueError:
            return JSONResponse({"error": "body must be a JSON object with a member"}, status_code=400)

        def validate_and_start() -> str:
            from membercare.campaigns.triggers import plan_trigger
            from membercare.timeutil import parse_as_of

            at = parse_as_of(params["at"], settings.shop_timezone) if "at" in params else None
            plan_trigger(engine, settings, event, params["member"], order=params.get("order"), ref=params.get("ref"),
                         at=at)
            return starter(params)

        try:
            run_id = await run_in_threadpool(validate_and_start)
        except UnknownNameError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except (InputError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        except Exception:  # noqa: BLE001 - Prefect unreachable or no deployment: the caller should retry
            return JSONResponse({"error": "could not start the flow run; retry later"}, status_code=503)
        return JSONResponse({"flow_run_id": run_id, "event": event}, status_code=202)

    return router
