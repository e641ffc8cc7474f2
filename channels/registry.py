"""The provider registry: provider name -> :class:`channels.base.Provider`, and the adapters built from it.

:data:`PROVIDERS` holds every provider membercare ships (one folder each under ``channels/``). Each channel
sends through one provider, chosen by name with ``MEMBERCARE_PROVIDER_<CHANNEL>``
(``MEMBERCARE_PROVIDER_EMAIL=sendgrid``, ``MEMBERCARE_PROVIDER_SMS=twilio``, ``MEMBERCARE_PROVIDER_PUSH=fcm``,
``MEMBERCARE_PROVIDER_LINE=line``);
unset, it is the first registered provider of that channel. The receiver mounts the webhooks of every
registered provider, whichever sends (events of a provider switched away from still arrive for a while).

``build_channels(env)`` returns an adapter for every channel whose provider's credentials are present (its
``primary_env``: ``MEMBERCARE_SENDGRID_API_KEY``, ``MEMBERCARE_TWILIO_ACCOUNT_SID``,
``MEMBERCARE_FIREBASE_CREDENTIALS``, ``MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN``). A channel that is *partly*
configured (a key but no sender, say) raises :class:`ConfigurationError` naming the missing variable rather
than being skipped quietly. Pass ``channels=`` to require specific channels.

Prefect Secret blocks feed the same config dataclasses: load the values in the flow and pass
``configs={Channel.EMAIL: SendGridConfig(...)}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from channels import fcm, line, sendgrid, twilio
from channels.base import ChannelAdapter, ConfigurationError, Provider
from membercare.models import Channel

# Registration order decides each channel's default provider.
PROVIDERS: dict[str, Provider] = {p.name: p for p in (sendgrid.PROVIDER, twilio.PROVIDER, fcm.PROVIDER, line.PROVIDER)}

PROVIDER_ENV = "MEMBERCARE_PROVIDER_{channel}"


def provider_env(channel: Channel) -> str:
    """The variable naming ``channel``'s provider, e.g. ``MEMBERCARE_PROVIDER_SMS``."""
    return PROVIDER_ENV.format(channel=channel.value.upper())


def get_provider(name: str) -> Provider:
    """The registered provider ``name``; :class:`ConfigurationError` listing the registered ones otherwise."""
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ConfigurationError(f"unknown provider {name!r}; registered: {', '.join(sorted(PROVIDERS))}") from None


def provider_for(channel: Channel | str, env: Mapping[str, str] | None = None) -> Provider:
    """The provider that sends ``channel``: the one named by ``MEMBERCARE_PROVIDER_<CHANNEL>``, else the
    first registered for the channel."""
    channel = Channel(channel)
    env = os.environ if env is None else env
    variable = provider_env(channel)
    name = (env.get(variable) or "").strip().lower()
    if name:
        provider = get_provider(name)
        if provider.channel is not channel:
            raise ConfigurationError(f"{variable}={name}: {name} sends {provider.channel.value}, not {channel.value}")
        return provider
    for provider in PROVIDERS.values():
        if provider.channel is channel:
            return provider
    raise ConfigurationError(f"no provider registered for channel {channel.value!r}")


def config_from_env(channel: Channel, env: Mapping[str, str]) -> Any:
    """The config object of ``channel``'s provider read from ``env`` (raises ConfigurationError naming a variable)."""
    return provider_for(channel, env).config_from_env(env)


def adapter_for(config: object) -> ChannelAdapter:
    """The adapter for one config object (the provider whose ``config_type`` it is builds it)."""
    for provider in PROVIDERS.values():
        if isinstance(config, provider.config_type):
            return provider.build(config)
    raise ConfigurationError(f"no adapter for {type(config).__name__}")


def unconfigured_channels(channels: Iterable[Channel | str], env: Mapping[str, str]) -> list[Channel]:
    """The channels whose provider is not set up at all: its primary variable is unset or blank.

    A shop that does not use a provider (LINE, say) never configures it; a campaign that lists that channel
    then runs on its other channels (the flow says so in its log). A provider that is set up only in part
    still fails with the :class:`ConfigurationError` naming the missing variable when it is built."""
    return [Channel(c) for c in channels if not (env.get(provider_for(Channel(c), env).primary_env) or "").strip()]


def build_channels(
    env: Mapping[str, str] | None = None,
    *,
    channels: Iterable[Channel | str] | None = None,
    configs: Mapping[Channel, object] | None = None,
) -> dict[Channel, ChannelAdapter]:
    """Adapters keyed by channel. ``configs`` wins over ``env`` per channel.

    With ``channels`` given, each listed channel must be configured; otherwise every channel whose
    provider's primary variable is set is built. Already-built adapters are closed if a later one fails.
    """
    env = os.environ if env is None else env
    configs = dict(configs or {})
    if channels is None:
        served = {provider.channel for provider in PROVIDERS.values()}
        wanted = [c for c in Channel if c in configs
                  or (c in served and (env.get(provider_for(c, env).primary_env) or "").strip())]
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
