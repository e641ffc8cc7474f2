"""``membercare sandbox``: run the local provider sandbox (SendGrid, Twilio and FCM wire APIs)."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

import typer

from membercare.cli import app
from membercare.cli.common import console, err_console
from membercare.errors import InputError


@app.command("sandbox")
def sandbox(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8025, "--port", help="Port to listen on (0: any free port)."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="Added latency per provider request."),
    fault_rate: float = typer.Option(0.0, "--fault-rate",
                                     help="Share of requests answered 5xx (per provider; see --config for timeouts "
                                          "and dropped connections)."),
    rate_limit: list[str] = typer.Option([], "--rate-limit",
                                         help="Per-provider rate limit, e.g. sms=10/s or email=600/min (repeatable)."),
    webhook_url: str | None = typer.Option(None, "--webhook-url",
                                           help="Base URL of the project's webhook receiver: simulated recipients "
                                                "post SendGrid events, Twilio STOP replies and push reports there."),
    seed: int = typer.Option(0, "--seed", help="Seed for faults and simulated recipients."),
    config_file: Path | None = typer.Option(None, "--config", exists=True, dir_okay=False,
                                            help="JSON file with any sandbox settings (see docs/channels.md)."),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="Allow a non-loopback --host (the sandbox accepts test credentials)."),
) -> None:
    """Run a local stand-in for SendGrid, Twilio and FCM until interrupted.

    Point the adapters at it with MEMBERCARE_SENDGRID_BASE_URL / MEMBERCARE_TWILIO_BASE_URL /
    MEMBERCARE_FCM_BASE_URL = http://HOST:PORT and a service account whose token_uri is http://HOST:PORT/token.
    Inspect it at /sandbox/messages and /sandbox/stats; change it at runtime with POST /sandbox/config.
    """
    import asyncio

    from membercare.sandbox import ConfigError, apply_patch, config_from_dict, parse_rate_limit
    from membercare.sandbox.server import new_event_loop, serve

    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = host == "localhost"
    if not is_loopback and not allow_remote:
        raise InputError(f"--host {host} is not a loopback address; add --allow-remote if you really mean it")
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")) if config_file else {}
        config = config_from_dict(base)
        patch: dict = {"seed": seed} if seed or "seed" not in base else {}
        for channel in ("email", "sms", "push"):
            section: dict = {}
            if latency_ms:
                section["latency_ms"] = latency_ms
            if fault_rate:
                section["error_rate"] = fault_rate
            if section:
                patch[channel] = section
        for spec in rate_limit:
            channel, rate = parse_rate_limit(spec)
            patch.setdefault(channel, {})["rate_limit"] = rate
        if webhook_url:
            patch["webhook_url"] = webhook_url
        secret = os.environ.get("MEMBERCARE_PUSH_TRACKING_SECRET")
        if secret and "push_tracking_secret" not in base:
            patch["push_tracking_secret"] = secret
        config = apply_patch(config, patch)
    except (ConfigError, ValueError) as exc:
        raise InputError(f"sandbox settings: {exc}") from None

    def ready(sandbox_app, bound: int) -> None:
        url = f"http://{host}:{bound}"
        console.print(f"[bold]membercare sandbox[/] listening on {url}")
        console.print(f"  SendGrid  POST {url}/v3/mail/send")
        console.print(f"  Twilio    POST {url}/2010-04-01/Accounts/{{AccountSid}}/Messages.json")
        console.print(f"  FCM       POST {url}/v1/projects/{{project}}/messages:send   (token_uri {url}/token)")
        console.print(f"  records   GET  {url}/sandbox/messages   GET {url}/sandbox/stats")
        console.print(f"  SendGrid webhook public key: {sandbox_app.signer.public_key_b64}")
        if not config.webhook_url:
            err_console.print("no --webhook-url: simulated engagement is not posted anywhere")
        sys.stdout.flush()  # the banner is how scripts learn the port (--port 0)

    runner = asyncio.Runner(loop_factory=new_event_loop)
    try:
        runner.run(serve(config, host, port, on_ready=ready))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        runner.close()
