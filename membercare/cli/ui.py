"""``membercare ui``: the Prefect server and UI on this project's Prefect home, until interrupted."""

from __future__ import annotations

import os
import subprocess
import sys

import typer

from membercare.cli import app
from membercare.cli.common import console


@app.command("ui")
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(4200, "--port", help="Port of the UI and its API."),
) -> None:
    """Start the Prefect server on this project's PREFECT_HOME (the demo's runs and artifacts) and print its URL."""
    env = dict(os.environ)
    # The UI's browser code calls this address: without it, any port but 4200 shows an unreachable API.
    env["PREFECT_UI_API_URL"] = f"http://{host}:{port}/api"
    env.pop("PREFECT_API_URL", None)  # this process *is* the server
    home = env.get("PREFECT_HOME", "~/.prefect (Prefect's default)")
    console.print(f"[bold]Prefect UI:[/] http://{host}:{port}/runs   (PREFECT_HOME {home}; Ctrl-C stops it)")
    console.print(f"other commands use it with PREFECT_API_URL=http://{host}:{port}/api")
    proc = subprocess.run([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                          env=env, check=False)
    raise typer.Exit(proc.returncode)
