"""The webhook receiver (FastAPI): ``create_app(config, engine)``; see :mod:`membercare.receiver.app`."""

from membercare.receiver.config import ReceiverConfig

__all__ = ["ReceiverConfig", "create_app"]


def create_app(config, engine, trigger_starter=None):
    # Imported lazily so that reading the configuration does not import FastAPI.
    from membercare.receiver.app import create_app as _create_app

    return _create_app(config, engine, trigger_starter)
