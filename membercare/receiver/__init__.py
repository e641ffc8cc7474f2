"""The webhook receiver (FastAPI): ``create_app(config, engine)``; see :mod:`membercare.receiver.app`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from membercare.receiver.config import ReceiverConfig

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from fastapi import FastAPI
    from sqlalchemy.engine import Engine

    from membercare.receiver.triggers import TriggerStarter

__all__ = ["ReceiverConfig", "create_app"]


def create_app(config: ReceiverConfig, engine: Engine, trigger_starter: TriggerStarter | None = None,
               clock: Callable[[], datetime] | None = None) -> FastAPI:
    # Imported lazily so that reading the configuration does not import FastAPI.
    from membercare.receiver.app import create_app as _create_app

    if clock is None:
        return _create_app(config, engine, trigger_starter)
    return _create_app(config, engine, trigger_starter, clock)
