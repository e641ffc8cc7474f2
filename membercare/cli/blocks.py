"""``membercare setup-blocks``: Prefect Secret blocks and global concurrency limits from the environment.

For each credential variable that is set (``MEMBERCARE_SENDGRID_API_KEY``, ..., LINE's
``MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN`` and ``MEMBERCARE_LINE_CHANNEL_SECRET``; the list is
``flows.common.SECRET_VARIABLES``), a Secret block named after it (``membercare-sendgrid-api-key``,
``membercare-line-channel-access-token``) is created or overwritten; the FCM service account file named by
``MEMBERCARE_FIREBASE_CREDENTIALS`` is stored as ``membercare-firebase-credentials`` (its JSON). Flows read
the blocks first and fall back to the variables, so workers need no secrets in their environment.

The global concurrency limits ``membercare-email``/``-sms``/``-push`` are created or updated from
``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` (messages per second; defaults in ``flows/ratelimits.py``): every
worker's dispatcher takes its sending slots from them.

Values are never printed; the command lists block names only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console
from membercare.errors import ConfigurationError


@app.command("setup-blocks")
def setup_blocks(
    limits: bool = typer.Option(True, "--limits/--no-limits", help="Also create the global rate limits."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be created; change nothing."),
) -> None:
    """Create Prefect Secret blocks and provider rate limits from MEMBERCARE_* environment variables."""
    from flows.common import FIREBASE_BLOCK, FIREBASE_VARIABLE, SECRET_VARIABLES, block_name
    from flows.ratelimits import configured_rates, limit_name

    env = os.environ
    todo: list[tuple[str, str, str]] = []  # (block, source, value)
    for var in SECRET_VARIABLES:
        value = (env.get(var) or "").strip()
        if value:
            todo.append((block_name(var), var, value))
    fcm = (env.get(FIREBASE_VARIABLE) or "").strip()
    if fcm:
        path = Path(fcm).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"{FIREBASE_VARIABLE}: cannot read a service-account JSON file ({exc})") from None
        todo.append((FIREBASE_BLOCK, f"{FIREBASE_VARIABLE} (file)", text))
    rates = configured_rates(env) if limits else {}

    t = Table(title="Prefect blocks and limits" + (" (dry run)" if dry_run else ""))
    t.add_column("kind")
    t.add_column("name")
    t.add_column("from")
    for name, source, _ in todo:
        t.add_row("Secret block", name, source)
    for ch, rate in rates.items():
        t.add_row("global concurrency limit", limit_name(ch), f"{rate:g} messages/s")
    if not todo:
        console.print("[yellow]no credential variables are set[/]: no Secret blocks to create")
    if dry_run:
        console.print(t)
        return

    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    from flows.ratelimits import ensure_limits

    for name, _, value in todo:
        Secret(value=SecretStr(value)).save(name, overwrite=True)
    if rates:
        ensure_limits(rates)
    console.print(t)
    console.print(f"created or updated {len(todo)} Secret block(s) and {len(rates)} limit(s)")
