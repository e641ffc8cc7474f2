"""Build the configured channel adapters from the environment (or explicit config objects).

``build_channels(env)`` returns an adapter for every channel whose credentials are present:
SendGrid when ``MEMBERCARE_SENDGRID_API_KEY`` is set, Twilio when ``MEMBERCARE_TWILIO_ACCOUNT_SID`` is
set, FCM when ``MEMBERCARE_FIREBASE_CREDENTIALS`` is set. A channel that is *partly* configured (a key
but no sender, say) raises :class:`ConfigurationError` naming the missing variable rather than being
skipped quietly. Pass ``channels=`` to require specific channels.

Prefect Secret blocks feed the same config dataclasses: load the values in the flow and pass
``configs={Channel.EMAIL: SendGridConfig(...)}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from channels.base import ChannelAdapter, ConfigurationError
from membercare.models import Channel

_PRIMARY = {
    Channel.EMAIL: "MEMBERCARE_SENDGRID_API_KEY",
    Channel.SMS: "MEMBERCARE_TWILIO_ACCOUNT_SID",
    Channel.PUSH: "MEMBERCARE_FIREBASE_CREDENTIALS",
}


def config_from_env(channel: Channel, env: Mapping[str, str]):
    """The config dataclass of ``channel`` read from ``env`` (raises ConfigurationError naming a variable)."""
    if channel is Channel.EMAIL:
        from channels.sendgrid import SendGridConfig

        return SendGridConfig.from_env(env)
    if channel is Channel.SMS:
        from channels.twilio import TwilioConfig

        return TwilioConfig.from_env(env)
    if channel is Channel.PUSH:
        from channels.fcm import FirebaseConfig

        return FirebaseConfig.from_env(env)
    raise ConfigurationError(f"no adapter for channel {channel!r}")


def adapter_for(config) -> ChannelAdapter:
    """The adapter for one config object."""
    from channels.fcm import FirebaseConfig, FirebasePushChannel
    from channels.sendgrid import SendGridConfig, SendGridEmailChannel
    from channels.twilio import TwilioConfig, TwilioSmsChannel

    if isinstance(config, SendGridConfig):
        return SendGridEmailChannel(config)
    if isinstance(config, TwilioConfig):
        return TwilioSmsChannel(config)
    if isinstance(config, FirebaseConfig):
        return FirebasePushChannel(config)
    raise ConfigurationError(f"no adapter for {type(config).__name__}")


def build_channels(
    env: Mapping[str, str] | None = None,
    *,
    channels: Iterable[Channel | str] | None = None,
    configs: Mapping[Channel, object] | None = None,
) -> dict[Channel, ChannelAdapter]:
    """Adapters keyed by channel. ``configs`` wins over ``env`` per channel.

    With ``channels`` given, each listed channel must be configured; otherwise every channel whose
    primary variable is set is built. Already-built adapters are closed if a later one fails.
    """
    env = os.environ if env is None else env
    configs = dict(configs or {})
    if channels is None:
        wanted = [c for c in Channel if c in configs or (env.get(_PRIMARY[c]) or "").strip()]
    else:
        wanted = [Channel(c) for c in channels]
    built: dict[Channel, ChannelAdapter] = {}
    try:
        for channel in wanted:
            config = configs.get(channel) or config_from_env(channel, env)
            built[channel] = adapter_for(config)
    except BaseException:
        for adapter in built.values():
            adapter.close()
        raise
    return built


def close_channels(adapters: Mapping[Channel, ChannelAdapter]) -> None:
    for adapter in adapters.values():
        adapter.close()
