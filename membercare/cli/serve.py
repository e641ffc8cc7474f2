"""``membercare serve``: run the webhook receiver (uvicorn)."""

from __future__ import annotations

import logging

import typer

from membercare.cli import app
from membercare.cli.common import console, err_console, migrated_engine, state


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="TCP port."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Receive provider webhooks, app push tracking and unsubscribe links.

    Providers must reach it at MEMBERCARE_PUBLIC_URL (Twilio signatures cover that exact URL). Secrets:
    MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY, MEMBERCARE_TWILIO_AUTH_TOKEN, MEMBERCARE_PUSH_TRACKING_SECRET,
    MEMBERCARE_SECRET_KEY, MEMBERCARE_LINE_CHANNEL_SECRET; an endpoint whose secret is missing answers 503.
    LINE account link: MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN and MEMBERCARE_LINE_LOGIN_URL (docs/line.md).
    """
    import uvicorn

    from flows.deployments import DeploymentStarter
    from membercare.receiver import ReceiverConfig, create_app

    config = ReceiverConfig.from_env(settings=state.settings)
    engine = migrated_engine()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for missing in config.disabled_endpoints():
        err_console.print(f"[yellow]warning:[/] {missing} is not configured: that endpoint answers 503")
    console.print(f"membercare receiver on http://{host}:{port} (public URL {config.public_url})")
    # The access log is off: link tokens are in the path (/u/{token}) and are credentials.
    # POST /triggers/{event} starts runs of the trigger-message deployment; the receiver itself knows no Prefect.
    uvicorn.run(create_app(config, engine, DeploymentStarter()), host=host, port=port, log_level=log_level.lower(),
                access_log=False, server_header=False, proxy_headers=False)
