"""One sandbox: its configuration, state and simulated recipients, the provider endpoints and the
``/sandbox/*`` control endpoints, as an aiohttp application (:meth:`SandboxApp.build`).

Why aiohttp: one process serves thousands of requests per second on one core (llhttp parser; uvloop when
installed), a handler can drop its connection for fault injection (ASGI servers cannot), and its client
posts the simulated webhooks on the same loop. :mod:`membercare.sandbox.server` runs an app on a thread
(tests) or until a signal (the CLI).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from channels.line.sandbox import LineLinkSandbox, LineSandbox
from channels.sendgrid.webhooks import SendGridWebhookSigner
from membercare.sandbox import pipeline
from membercare.sandbox.config import CHANNELS, ConfigError, SandboxConfig, apply_patch
from membercare.sandbox.endpoints import FcmEndpoints, SendGridEndpoints, TwilioEndpoints
from membercare.sandbox.pipeline import Fault, Ghost
from membercare.sandbox.recipients import EngagementModel, EventClock, Recipients
from membercare.sandbox.state import MessageRecord, SandboxState


class SandboxApp:
    """State, configuration and handlers of one sandbox. ``build()`` returns the aiohttp application."""

    def __init__(self, config: SandboxConfig | None = None, *, model: EngagementModel | None = None,
                 clock: EventClock | None = None):
        self.initial_config = config or SandboxConfig()
        self.config = self.initial_config.validate()
        self.state = SandboxState()
        self.signer = SendGridWebhookSigner.from_seed(self.config.seed)
        self.initial_clock = clock
        self.recipients = Recipients(lambda: self.config, self.state, model, self.signer, clock)
        # OAuth access tokens outlive /sandbox/reset: clients cache them for an hour.
        self.fcm_access_tokens: dict[str, str] = {}
        self.line = LineSandbox(self)  # LINE's Messaging API (channels/line/sandbox.py); keeps retry keys
        self.line_links = LineLinkSandbox(self)  # LINE's link tokens, replies and account-link dialog

    def build(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024**2)
        for endpoints in (SendGridEndpoints(self), TwilioEndpoints(self), FcmEndpoints(self), self.line,
                          self.line_links):
            app.router.add_routes(endpoints.routes())
        r = app.router
        r.add_get("/sandbox/health", self.health)
        r.add_get("/sandbox/messages", self.get_messages)
        r.add_get("/sandbox/stats", self.get_stats)
        r.add_get("/sandbox/config", self.get_config)
        r.add_post("/sandbox/config", self.post_config)
        r.add_post("/sandbox/reset", self.post_reset)
        r.add_post("/sandbox/drain", self.post_drain)
        r.add_get("/sandbox/requests", self.get_requests)
        r.add_get("/sandbox/keys", self.get_keys)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.recipients.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.recipients.stop()

    # ------------------------------------------------------------------ control API (Python)

    def reconfigure(self, patch: dict[str, Any]) -> SandboxConfig:
        new = apply_patch(self.config, patch)
        if new.seed != self.config.seed:
            self.signer = SendGridWebhookSigner.from_seed(new.seed)
            self.recipients.signer = self.signer
        self.config = new
        return new

    def reset(self, *, config: bool = False) -> None:
        self.state.reset()
        self.line.reset()
        self.line_links.reset()
        self.recipients.clear()
        if config:
            self.config = self.initial_config
            self.recipients.clock = self.initial_clock

    def messages(self, channel: str | None = None, since: int = 0, limit: int | None = None) -> list[dict]:
        out = []
        for rec in self.state.records:
            if rec.seq <= since or (channel and rec.channel != channel):
                continue
            out.append(rec.to_json())
            if limit is not None and len(out) >= limit:
                break
        return out

    def stats(self) -> dict[str, Any]:
        return self.state.stats.to_json(self.recipients.pending)

    # ------------------------------------------------------------------ the pipeline the provider endpoints share

    def capture(self, request: web.Request, raw: bytes) -> None:
        """Keep the request (without its credentials) for ``/sandbox/requests`` when ``capture_requests`` is on."""
        limit = self.config.capture_requests
        if limit:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
            self.state.capture(limit, {"method": request.method, "path": request.path_qs, "headers": headers,
                                       "body": raw.decode("utf-8", "replace"), "time": time.time()})

    async def gate(self, request: web.Request, channel: str, raw: bytes) -> Fault | Ghost | None:
        """Latency, faults and rate limit under the current configuration (:func:`.pipeline.gate`)."""
        return await pipeline.gate(request, channel, raw, self.config, self.state)

    def reject(self, channel: str, reason: str) -> None:
        """Count a request refused before acceptance (``stats.rejected[channel][reason]``)."""
        self.state.stats.rejected[channel][reason] += 1

    def accept(self, rec: MessageRecord) -> None:
        """Record an accepted message and hand it to the simulated recipient."""
        self.state.record(rec)
        self.recipients.on_accepted(rec)

    # ------------------------------------------------------------------ control API (HTTP)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def get_messages(self, request: web.Request) -> web.Response:
        q = request.query
        channel = q.get("channel")
        if channel and channel not in CHANNELS:
            return web.json_response({"error": f"unknown channel {channel!r}"}, status=400)
        try:
            since = int(q.get("since", 0))
            limit = int(q["limit"]) if "limit" in q else None
        except ValueError:
            return web.json_response({"error": "since and limit must be integers"}, status=400)
        items = self.messages(channel, since, limit)
        return web.json_response({"messages": items, "count": len(items),
                                  "last_seq": items[-1]["seq"] if items else since})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config.to_dict())

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            patch = await request.json()
            self.reconfigure(patch)
        except (ValueError, ConfigError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.config.to_dict())

    async def post_reset(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        self.reset(config=bool(isinstance(body, dict) and body.get("config")))
        return web.json_response({"ok": True})

    async def post_drain(self, request: web.Request) -> web.Response:
        timeout = float(request.query.get("timeout", 10))
        drained = await self.recipients.drain(timeout)
        return web.json_response({"drained": drained, "pending": self.recipients.pending})

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": list(self.state.captured)})

    async def get_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"sendgrid_webhook_public_key": self.signer.public_key_b64})

