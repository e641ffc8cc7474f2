"""Explicit configuration objects, read from the environment once and passed around.

Nothing in the core reads ``os.environ`` on its own: a command builds a :class:`Settings`
with :meth:`Settings.from_env` and hands it (or the parts it needs) down. Tests build
``Settings(...)`` directly.

Environment variables (all optional):

``MEMBERCARE_HOME``           working folder for the embedded defaults (default ``./.membercare``)
``MEMBERCARE_DATABASE_URL``   SQLAlchemy URL; default SQLite file ``$MEMBERCARE_HOME/membercare.db``.
                              ``postgresql://`` URLs are rewritten to the psycopg 3 driver.
``MEMBERCARE_TEMPLATES_DIR``  template folder (default: the project's ``templates/``)
``MEMBERCARE_SHOP_TIMEZONE``  IANA zone of the shop (default ``Asia/Taipei``)
``MEMBERCARE_SHOP_LOCALE``    shop default locale (default ``zh-TW``)
``MEMBERCARE_SHOP_CURRENCY``  ISO 4217 currency (default ``TWD``)
``MEMBERCARE_SHOP_COUNTRY``   default region for phone numbers without a country code (default ``TW``)
``MEMBERCARE_PUBLIC_URL``     externally visible base URL of ``membercare serve`` (links, callbacks;
                              default ``http://127.0.0.1:8080``)
``MEMBERCARE_SECRET_KEY``     signs unsubscribe/preference tokens; required to send (never in the repo)
``MEMBERCARE_GLOBAL_CONTROL_RATE``  share of members in the programme-wide control group, who get no
                              marketing at all (default ``0`` = off; e.g. ``0.05``)
``MEMBERCARE_GLOBAL_CONTROL_SALT``  names the control group's measurement period (default ``membercare``);
                              changing it draws a new group (see docs/optimisation.md)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from membercare.errors import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_templates_dir() -> Path:
    """The project's ``templates/`` in a checkout, else the copy bundled into the wheel."""
    in_checkout = PROJECT_ROOT / "templates"
    if in_checkout.is_dir():
        return in_checkout
    return Path(__file__).resolve().parent / "_bundled_templates"


def normalise_database_url(url: str) -> str:
    """Point bare ``postgresql://`` URLs at psycopg 3 (SQLAlchemy would otherwise pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path.cwd() / ".membercare")
    database_url: str | None = None
    templates_dir: Path = field(default_factory=default_templates_dir)
    shop_timezone: str = "Asia/Taipei"
    shop_locale: str = "zh-TW"
    shop_currency: str = "TWD"
    shop_country: str = "TW"
    public_url: str = "http://127.0.0.1:8080"
    secret_key: str | None = field(default=None, repr=False)
    global_control_rate: float = 0.0
    global_control_salt: str = "membercare"

    def __post_init__(self) -> None:
        rate = self.global_control_rate
        if not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
            raise ConfigurationError(f"MEMBERCARE_GLOBAL_CONTROL_RATE must be a number in [0, 1), got {rate!r}")
        if not self.global_control_salt or "\x1f" in self.global_control_salt:
            raise ConfigurationError("MEMBERCARE_GLOBAL_CONTROL_SALT must be a non-empty text")

    @property
    def db_url(self) -> str:
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{self.home / 'membercare.db'}"

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        s = cls()
        if env.get("MEMBERCARE_HOME"):
            s = replace(s, home=Path(env["MEMBERCARE_HOME"]).expanduser().resolve())
        if env.get("MEMBERCARE_DATABASE_URL"):
            s = replace(s, database_url=env["MEMBERCARE_DATABASE_URL"])
        if env.get("MEMBERCARE_TEMPLATES_DIR"):
            s = replace(s, templates_dir=Path(env["MEMBERCARE_TEMPLATES_DIR"]).expanduser().resolve())
        for key, attr in (
            ("MEMBERCARE_SHOP_TIMEZONE", "shop_timezone"),
            ("MEMBERCARE_SHOP_LOCALE", "shop_locale"),
            ("MEMBERCARE_SHOP_CURRENCY", "shop_currency"),
            ("MEMBERCARE_SHOP_COUNTRY", "shop_country"),
            ("MEMBERCARE_PUBLIC_URL", "public_url"),
            ("MEMBERCARE_SECRET_KEY", "secret_key"),
        ):
            if env.get(key):
                change: dict[str, Any] = {attr: env[key]}  # (replace() cannot type a field chosen at run time)
                s = replace(s, **change)
        if env.get("MEMBERCARE_GLOBAL_CONTROL_RATE"):
            raw = env["MEMBERCARE_GLOBAL_CONTROL_RATE"].strip()
            try:
                rate = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
            except ValueError:
                    raise ConfigurationError(
                    f"MEMBERCARE_GLOBAL_CONTROL_RATE must be a number in [0, 1) such as 0.05 (or 5%), got {raw!r}"
                ) from None
            s = replace(s, global_control_rate=rate)
        if env.get("MEMBERCARE_GLOBAL_CONTROL_SALT"):
            s = replace(s, global_control_salt=env["MEMBERCARE_GLOBAL_CONTROL_SALT"])
        return s

    def ensure_home(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home
