"""What every membercare flow shares: settings and credentials, the engine, retry rules, artifacts.

**Credentials** come from Prefect Secret blocks when they exist, else from environment variables, and
feed the same ``Settings`` and channel config dataclasses either way (``membercare setup-blocks`` creates
the blocks from the environment). A block is named after its variable: ``MEMBERCARE_SENDGRID_API_KEY``
-> ``membercare-sendgrid-api-key``. The FCM service account is stored as the JSON itself
(``membercare-firebase-credentials``) and written to a private temporary file for firebase-admin.

**Retries** are for transient failures only (:func:`retry_transient`): a locked or unreachable database,
a dropped connection. Configuration errors, paused runs and template errors fail at once; retrying them
would only repeat the failure (and the stages are idempotent, so a retry is always safe).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.config import Settings
from membercare.errors import MembercareError

# Variables that may live in Secret blocks (credentials and signing keys only; base URLs stay env vars).
SECRET_VARIABLES: tuple[str, ...] = (
    "MEMBERCARE_SECRET_KEY",
    "MEMBERCARE_SENDGRID_API_KEY",
    "MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY",
    "MEMBERCARE_TWILIO_ACCOUNT_SID",
    "MEMBERCARE_TWILIO_AUTH_TOKEN",
    "MEMBERCARE_PUSH_TRACKING_SECRET",
    "MEMBERCARE_TRIGGER_SECRET",
    "MEMBERCARE_DATABASE_URL",  # holds the database password in production
    "MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN",  # sends LINE messages and issues account-link tokens
    "MEMBERCARE_LINE_CHANNEL_SECRET",  # verifies LINE's webhooks (X-Line-Signature)
)
FIREBASE_VARIABLE = "MEMBERCARE_FIREBASE_CREDENTIALS"
FIREBASE_BLOCK = "membercare-firebase-credentials"


def block_name(variable: str) -> str:
    """``MEMBERCARE_SENDGRID_API_KEY`` -> ``membercare-sendgrid-api-key`` (Prefect block names are slugs)."""
    return variable.lower().replace("_", "-")


def _load_secret(name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        # Secret.load is sync or async depending on the caller's context (typed as either); here it is sync.
        block: Any = Secret.load(name)
        value = block.get()
    except ValueError:  # "Unable to find block document named ..."
        return None
    except Exception as exc:  # noqa: BLE001 - the API is unreachable: say so, then fall back to the env
        logging.getLogger("membercare.flows").warning("cannot read Secret block %s (%s); using the environment",
                                                      name, type(exc).__name__)
        return None
    return value if isinstance(value, str) else None


@lru_cache(maxsize=1)
def _private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="membercare-secrets-"))


def resolved_env(env: Mapping[str, str] | None = None, *, use_blocks: bool = True) -> dict[str, str]:
    """The process environment with Secret block values filled in (blocks win over variables)."""
    out = dict(os.environ if env is None else env)
    if not use_blocks or out.get("MEMBERCARE_NO_SECRET_BLOCKS"):
        return out
    for var in SECRET_VARIABLES:
        value = _load_secret(block_name(var))
        if value:
            out[var] = value
    fcm = _load_secret(FIREBASE_BLOCK)
    if fcm:
        path = _private_dir() / "firebase-service-account.json"
        path.write_text(fcm, encoding="utf-8")
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        out[FIREBASE_VARIABLE] = str(path)
    return out


def settings_from(env: Mapping[str, str]) -> Settings:
    return Settings.from_env(dict(env))


_ENGINES: dict[str, Engine] = {}


def engine_for(settings: Settings) -> Engine:
    """One engine per database URL per process (flows and their tasks share the pool), migrated to head."""
    from membercare.db import current_revision, head_revision, make_engine, upgrade

    url = settings.db_url
    engine = _ENGINES.get(url)
    if engine is None:
        if not settings.database_url:
            settings.ensure_home()
        engine = make_engine(url)
        if current_revision(engine) != head_revision():
            upgrade(url)
        _ENGINES[url] = engine
    return engine


# ----------------------------------------------------------------------------------------------- retries

_TRANSIENT = (sa.exc.OperationalError, sa.exc.DisconnectionError, sa.exc.TimeoutError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: the database or the network hiccuped. Never our own deliberate errors."""
    if exc is None or isinstance(exc, MembercareError):
        return False
    if isinstance(exc, sa.exc.DBAPIError) and getattr(exc, "connection_invalidated", False):
        return True
    return isinstance(exc, _TRANSIENT)


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` for membercare tasks: retry only :func:`is_transient` failures."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify, Prefect re-raises
        return is_transient(exc)
    return False


# --------------------------------------------------------------------------------------------- helpers


def artifact_key(*parts: str) -> str:
    """Artifact keys must be lowercase letters, digits and dashes."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:100] or "membercare"


def file_link(path: Path) -> str:
    return Path(path).resolve().as_uri()


def preview_link(settings, path: Path) -> str:
    """The link a run's artifact gives to its rendered preview ``path`` (``<home>/previews/<name>/index.html``):
    ``{public_url}/previews/{token}``, served by the receiver behind a signed, expiring token
    (membercare.receiver.previews), so it opens from any host; a ``file://`` path only when no secret key is
    configured (a local dry run)."""
    import time

    from membercare.links import PREVIEW_SECRET, preview_url

    key = settings.secret_key
    if not key or key == PREVIEW_SECRET:
        return file_link(path)
    return preview_url(settings.public_url, Path(path).parent.name, key, time.time())


__all__ = [
    "SECRET_VARIABLES", "run_logger", "artifact_key", "block_name", "engine_for",
    "file_link", "is_transient", "preview_link", "resolved_env", "retry_transient", "settings_from",
]


def run_logger():
    """The Prefect run logger inside a flow or task run; a plain logger for task bodies called via ``.fn()``."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("membercare.flows")
