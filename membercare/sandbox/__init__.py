"""A local stand-in for SendGrid, Twilio and FCM that speaks their wire APIs (Prefect-free).

Start one with ``membercare sandbox`` or in-process with :class:`SandboxServer`; point the adapters at it
with ``MEMBERCARE_SENDGRID_BASE_URL`` / ``MEMBERCARE_TWILIO_BASE_URL`` / ``MEMBERCARE_FCM_BASE_URL`` and a
service account whose ``token_uri`` is ``<sandbox>/token``. See docs/channels.md.
"""

from membercare.sandbox.app import SandboxApp
from membercare.sandbox.config import (
    ChannelBehaviour,
    ConfigError,
    EngagementRates,
    EngagementRule,
    SandboxConfig,
    apply_patch,
    config_from_dict,
    parse_rate_limit,
)
from membercare.sandbox.recipients import EngagementModel, RecipientContext
from membercare.sandbox.server import SandboxServer, serve

__all__ = [
    "ChannelBehaviour",
    "ConfigError",
    "EngagementModel",
    "EngagementRates",
    "EngagementRule",
    "RecipientContext",
    "SandboxApp",
    "SandboxConfig",
    "SandboxServer",
    "apply_patch",
    "config_from_dict",
    "parse_rate_limit",
    "serve",
]
