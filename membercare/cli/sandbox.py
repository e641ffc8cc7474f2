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
    write_config: bool = typer.Option(False, "--write-config",
                                      help="Write the project configuration (.membercare/config.toml, as "
                                           "`membercare demo` does) pointing every provider at this sandbox, so "
                                           "every membercare command in this folder sends to it."),
) -> None:
    """Run a local stand-in for SendGrid, Twilio, FCM and LINE until interrupted.

    Point the adapters at it with MEMBERCARE_SENDGRID_BASE_URL / MEMBERCARE_TWILIO_BASE_URL /
    MEMBERCARE_FCM_BASE_URL / MEMBERCARE_LINE_BASE_URL = http://HOST:PORT and a service account whose token_uri
    is http://HOST:PORT/token.
    Inspect it at /sandbox/messages and /sandbox/stats; change it at runtime with POST /sandbox/config.
    With --write-config, the project file does all of that for the commands run in this folder.
    """
    import asyncio

    from membercare.sandbox import ConfigError, apply_patch, config_from_dict, parse_rate_limit
    from membercare.sandbox.config import CHANNELS
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
        for channel in CHANNELS:
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
        for variable, setting in (("MEMBERCARE_PUSH_TRACKING_SECRET", "push_tracking_secret"),
                                  ("MEMBERCARE_LINE_CHANNEL_SECRET", "line_channel_secret")):
            secret = os.environ.get(variable)
            if secret and setting not in base:
                patch[setting] = secret
        config = apply_patch(config, patch)
    except (ConfigError, ValueError) as exc:
        raise InputError(f"sandbox settings: {exc}") from None

    def ready(sandbox_app, bound: int) -> None:
        _banner(sandbox_app, f"http://{host}:{bound}", write_config=write_config, webhook=bool(config.webhook_url))

    runner = asyncio.Runner(loop_factory=new_event_loop)
    try:
        runner.run(serve(config, host, port, on_ready=ready))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        runner.close()


def _banner(sandbox_app, url: str, *, write_config: bool, webhook: bool) -> None:
    # The file is written before the banner: a script that waits for the banner may use it at once.
    path = write_sandbox_config(url) if write_config else None
    console.print(f"[bold]membercare sandbox[/] listening on {url}")
    console.print(f"  SendGrid  POST {url}/v3/mail/send")
    console.print(f"  Twilio    POST {url}/2010-04-01/Accounts/{{AccountSid}}/Messages.json")
    console.print(f"  FCM       POST {url}/v1/projects/{{project}}/messages:send   (token_uri {url}/token)")
    console.print(f"  LINE      POST {url}/v2/bot/message/push")
    console.print(f"  records   GET  {url}/sandbox/messages   GET {url}/sandbox/stats")
    console.print(f"  SendGrid webhook public key: {sandbox_app.signer.public_key_b64}")
    if path is not None:
        console.print(f"  wrote {path}: every membercare command in this folder now sends to this sandbox")
    if not webhook:
        err_console.print("no --webhook-url: simulated engagement is not posted anywhere")
    sys.stdout.flush()  # the banner is how scripts learn the port (--port 0)


def write_sandbox_config(url: str) -> Path:
    """The project file ``membercare demo`` writes (database, Prefect home, secret key, sandbox credentials),
    with the providers pointed at the sandbox at ``url``; a secret key is generated once if none is set."""
    import tomllib

    from membercare.cli.common import state
    from membercare.cli.demo import demo_secret_key, service_account, write_demo_config
    from membercare.cli.project import SANDBOX_PORT, config_path, write_project_config

    home = config_path().parent
    home.mkdir(parents=True, exist_ok=True)
    demo_secret_key(home)
    path = write_demo_config(home, state.settings)
    default = f"http://127.0.0.1:{SANDBOX_PORT}"
    if url == default:
        return path
    # Another port or address: the same file with this sandbox's URL, and a service-account key whose
    # token_uri is this sandbox's (firebase-admin fetches its OAuth token there).
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    service_account(home, f"{url}/token", name="service-account-standalone.json")
    env = {k: str(v).replace(default, url) for k, v in data["env"].items()}
    key_file = (data.get("membercare") or {}).get("secret_key_file")
    return write_project_config(home, env, secret_key_file=key_file,
                                comments={"MEMBERCARE_SENDGRID_BASE_URL": f"`membercare sandbox` at {url}"})
