"""``POST /triggers/{event}``: the shop's systems start event-triggered messages for one member.

Body (JSON): ``{"member": "M0000042", "order": "O123" (optional), "ref": "R9" (optional), "at": ISO (optional)}``,
signed like the app's push reports: header ``X-Membercare-Signature: sha256=<hex HMAC-SHA256 of the raw
body>`` with ``MEMBERCARE_TRIGGER_SECRET``. Without the secret the endpoint answers 503.

Answers: 401/403 for a missing/wrong signature (checked before anything else is read or parsed); 413 for a
body over ``MAX_BODY`` and 400 for one that is not UTF-8 (the receiver's ``BodyLimit`` middleware, as the body
streams in); 400 for JSON that is malformed, nested deeper than ``MAX_JSON_DEPTH`` or lacks a member, and for
a value with a control character or over ``MAX_VALUE`` characters; 404 for an unknown event; 422 for an
unknown member or order (or a value the database cannot hold); 503 when no :class:`TriggerStarter` is wired
or it fails (logged; the caller should retry); 202 with the flow run otherwise.

The request is validated against the database (event, member, order) and answered ``202`` with the id the
:class:`TriggerStarter` returns. The receiver itself never sends and knows nothing of Prefect: ``membercare
serve`` wires :class:`flows.deployments.DeploymentStarter`, which creates a run of the ``trigger-message``
deployment (``prefect.yaml``) for a worker to pick up.

Mount it with ``app.include_router(build_trigger_router(engine, TriggerConfig.from_env(), settings, starter))``
in an app wrapped by :class:`membercare.receiver.app.BodyLimit` (``create_app`` does both), which bounds the body.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool

from channels.fcm.webhooks import SIGNATURE_HEADER, verify_push_tracking
from membercare.config import Settings
from membercare.engagement.events import MalformedPayload, loads_json, usable_id
from membercare.errors import InputError, UnknownNameError

MAX_BODY = 16 * 1024

log = logging.getLogger(__name__)


class TriggerStarter(Protocol):
    """Hands one accepted trigger to the orchestrator; the extension point between the receiver and Prefect.

    Called from a worker thread, once per request, only after the request was authenticated and validated
    against the database. ``parameters`` holds ``event`` and ``member`` and, when given, ``order``, ``ref``
    and ``at`` (all strings): the parameters of the ``trigger-message`` flow. Returns an id the caller can
    follow (the flow run's). It must only schedule the work, never send. Any exception means "not now"
    (orchestrator unreachable, deployment missing): the receiver logs its type and answers 503 so that the
    shop's system retries. The Prefect implementation is :class:`flows.deployments.DeploymentStarter`.
    """

    def __call__(self, parameters: dict[str, str]) -> str: ...


@dataclass(frozen=True)
class TriggerConfig:
    secret: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TriggerConfig:
        env = os.environ if env is None else env
        return cls(secret=(env.get("MEMBERCARE_TRIGGER_SECRET") or "").strip() or None)


def build_trigger_router(engine: Engine, config: TriggerConfig, settings: Settings | None = None,
                         starter: TriggerStarter | None = None) -> APIRouter:
    """The ``POST /triggers/{event}`` route; without a ``starter`` it answers 503 (nothing could run the work)."""
    router = APIRouter()
    settings = settings or Settings.from_env()

    @router.post("/triggers/{event}")
    async def trigger(event: str, request: Request) -> JSONResponse:
        if not config.secret:
            return JSONResponse({"error": "MEMBERCARE_TRIGGER_SECRET is not configured"}, status_code=503)
        # Checked before the body is read: an unsigned request costs nothing. The body itself is bounded
        # (MAX_BODY) and checked to be UTF-8 by the receiver's BodyLimit middleware as it streams in.
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return JSONResponse({"error": "missing signature"}, status_code=401)
        body = await request.body()
        if not verify_push_tracking(config.secret, body, signature):
            return JSONResponse({"error": "bad signature"}, status_code=403)
        try:
            params = _parameters(event, loads_json(body))
        except MalformedPayload as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if starter is None:
            # Not configured, like a missing secret; checked after the body so that bad requests still get a 400.
            return JSONResponse({"error": "no flow-run starter is configured"}, status_code=503)

        def validate() -> None:
            from membercare.campaigns.triggers import plan_trigger
            from membercare.timeutil import parse_as_of

            at = parse_as_of(params["at"], settings.shop_timezone) if "at" in params else None
            plan_trigger(engine, settings, event, params["member"], order=params.get("order"), ref=params.get("ref"),
                         at=at)

        try:
            await run_in_threadpool(validate)
        except UnknownNameError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except (InputError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        except (DataError, OverflowError):
            # The database (or its driver) refused a value, e.g. a member number beyond 64 bits: the request
            # is wrong, and retrying it would fail the same way, so it must not get the 503 below.
            return JSONResponse({"error": "a value in the request is out of range for the database"}, status_code=422)
        except Exception as exc:  # noqa: BLE001 - database unreachable: the caller should retry
            return _unavailable(event, "validate the request", exc)
        try:
            run_id = await run_in_threadpool(starter, params)
        except Exception as exc:  # noqa: BLE001 - orchestrator unreachable or no deployment: the caller should retry
            return _unavailable(event, "start the flow run", exc)
        return JSONResponse({"flow_run_id": run_id, "event": event}, status_code=202)

    return router


def _unavailable(event: str, what: str, exc: Exception) -> JSONResponse:
    # The type only: the exception's text may quote the parameters (member and order numbers). The event name
    # is safe to log: it was checked for length and control characters.
    log.warning("trigger %s: could not %s (%s); answered 503", event, what, type(exc).__name__)
    return JSONResponse({"error": "could not start the flow run; retry later"}, status_code=503)


# Identifiers of the shop's systems (member and order numbers, references, ISO times) are short.
MAX_VALUE = 200


def _parameters(event: str, data: Any) -> dict[str, str]:
    """The flow run's parameters from the JSON body; :class:`MalformedPayload` (400) when they are unusable.

    A value with a control character (NUL, which PostgreSQL text cannot hold, or any other) or longer than
    ``MAX_VALUE`` can name no member or order, so it is refused here, with the field's name, rather than
    reaching the database.
    """
    if not isinstance(data, dict) or not isinstance(data.get("member"), (str, int)) or isinstance(data["member"], bool):
        raise MalformedPayload("body must be a JSON object with a member")
    if usable_id(event, MAX_VALUE) is None:
        raise MalformedPayload(f"the event name must be at most {MAX_VALUE} characters without control characters")
    params = {"event": event}
    for name in ("member", "order", "ref", "at"):
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise MalformedPayload(f"{name} must be a string or an integer")
        if usable_id(str(value), MAX_VALUE) is None:
            raise MalformedPayload(f"{name} must be at most {MAX_VALUE} characters without control characters")
        params[name] = str(value)
    return params
