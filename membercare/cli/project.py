"""The project configuration: ``.membercare/config.toml``, read by every command run in that folder.

``membercare demo`` writes it (``membercare project-config`` rewrites it), so that after the demo the other
commands in the same folder use the demo's database, Prefect home, secret key and provider credentials
(pointed at the sandbox that ``membercare sandbox`` serves on its default port) without any environment
variable. The file::

    # written by `membercare demo`; read by every membercare command run in this folder
    [membercare]
    secret_key_file = "secret_key"          # relative to this folder; the key itself is never in this file

    [env]                                   # environment variables, exactly as the commands read them
    MEMBERCARE_DATABASE_URL = "sqlite:////path/.membercare/membercare.db"
    PREFECT_HOME = "/path/.membercare/prefect"
    MEMBERCARE_SENDGRID_BASE_URL = "http://127.0.0.1:8025"
    ...

Where it is looked for: ``$MEMBERCARE_HOME/config.toml`` when ``MEMBERCARE_HOME`` is set, else
``./.membercare/config.toml``. Variables already set in the environment win over the file (so one command
can still be pointed elsewhere); ``MEMBERCARE_NO_PROJECT_CONFIG=1`` ignores the file altogether.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

from membercare.errors import ConfigurationError

FILENAME = "config.toml"
SANDBOX_PORT = 8025  # `membercare sandbox` listens here by default
# Prefect's local ephemeral server can take longer than Prefect's default wait to start on a busy 2-core
# machine ("Timed out while attempting to connect to ephemeral Prefect API server"); the benchmarks use 180 s.
PREFECT_STARTUP_TIMEOUT_S = "180"
# Prefect settings every command uses unless the environment or the project file says otherwise: the local
# server's analytics heartbeat off (without internet it logs an ERROR with a traceback on every command that
# starts the server: "send_telemetry_heartbeat"), and the start-up timeout above.
PREFECT_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": PREFECT_STARTUP_TIMEOUT_S,
}
PREFECT_TIMEOUT_MESSAGE = "Timed out while attempting to connect to ephemeral Prefect API server"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("MEMBERCARE_HOME")
    base = Path(home).expanduser() if home else Path.cwd() / ".membercare"
    return base / FILENAME


def read_project_config(path: Path) -> dict[str, str]:
    """The environment variables a project file sets (the secret key read from its file)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str | int | float | bool) for v in env.values()):
        raise ConfigurationError(f"{path}: [env] must hold NAME = \"value\" pairs")
    out = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}
    key_file = (data.get("membercare") or {}).get("secret_key_file")
    if key_file:
        kp = (path.parent / str(key_file)).expanduser()
        if not kp.is_file():
            raise ConfigurationError(f"{path}: secret_key_file {kp} does not exist")
        out["MEMBERCARE_SECRET_KEY"] = kp.read_text(encoding="utf-8").strip()
    return out


def apply_project_config(environ: os._Environ[str] | dict[str, str] | None = None) -> Path | None:
    """Fill unset variables of ``environ`` from the project file (if any) and the Prefect defaults.

    Returns the file read, or None. Called by the CLI before any command runs, so before Prefect is imported.
    """
    environ = os.environ if environ is None else environ
    path = None
    if not environ.get("MEMBERCARE_NO_PROJECT_CONFIG"):
        candidate = config_path(environ)
        if candidate.is_file():
            path = candidate
            for k, v in read_project_config(candidate).items():
                environ.setdefault(k, v)
    for k, v in PREFECT_DEFAULTS.items():
        environ.setdefault(k, v)
    return path


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_project_config(home: Path, env: Mapping[str, str], *, secret_key_file: str | None = "secret_key",
                         comments: Mapping[str, str] | None = None) -> Path:
    """Write ``home/config.toml`` (mode 600: it holds provider credentials, if only the sandbox's)."""
    comments = comments or {}
    lines = ["# written by `membercare demo`; every membercare command run in this folder reads it.",
             "# Environment variables that are set win over this file; see docs/operations.md.", ""]
    if secret_key_file:
        lines += ["[membercare]", f"secret_key_file = {_toml_str(secret_key_file)}  # relative to this folder", ""]
    lines.append("[env]")
    for k in env:
        note = f"  # {comments[k]}" if k in comments else ""
        lines.append(f"{k} = {_toml_str(env[k])}{note}")
    path = home / FILENAME
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


__all__ = ["FILENAME", "PREFECT_DEFAULTS", "SANDBOX_PORT", "apply_project_config", "config_path",
           "read_project_config", "write_project_config"]
