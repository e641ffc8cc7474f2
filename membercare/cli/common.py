"""Shared CLI plumbing: consoles, settings and the engine for the current invocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from rich.console import Console

from membercare.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class _State:
    debug: bool = False
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def reset(self) -> None:
        """Forget settings and engine read before the environment changed (the project file was applied)."""
        self._settings = None
        self.__dict__.pop("engine", None)

    @cached_property
    def engine(self) -> Engine:
        from membercare.db import engine_from_settings

        return engine_from_settings(self.settings)


state = _State()


def provider_env() -> dict[str, str]:
    """The environment provider adapters are configured from (credentials, sandbox URLs)."""
    import os

    return dict(os.environ)


def migrated_engine() -> Engine:
    """The configured database, upgraded to the latest schema first (idempotent and quick)."""
    from membercare.db import pending_revisions, upgrade

    engine = state.engine
    if pending_revisions(engine):
        upgrade(state.settings.db_url)
    return engine
