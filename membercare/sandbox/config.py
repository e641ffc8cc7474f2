"""Sandbox settings: a plain dataclass tree, built from CLI flags or JSON, patchable at runtime.

``POST /sandbox/config`` takes a partial JSON object (e.g. ``{"email": {"error_rate": 0.2}}``) and merges
it into the current settings; unknown keys and out-of-range values are refused with 400, so a typo in a
test never silently leaves a fault switched off.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from membercare.errors import ConfigurationError

CHANNELS = ("email", "sms", "push")


class ConfigError(ConfigurationError, ValueError):
    """A sandbox setting is unknown or out of range."""


@dataclass
class ChannelBehaviour:
    """How one provider behaves. Fault rates are per request and add up to at most 1."""

    latency_ms: float = 0.0  # added to every request (asyncio.sleep: never blocks the server)
    latency_jitter_ms: float = 0.0  # uniform extra latency in [0, jitter]
    error_rate: float = 0.0  # answer 500/503 without accepting
    timeout_rate: float = 0.0  # hold the request for timeout_hold_s (past the client's timeout), unaccepted
    drop_rate: float = 0.0  # close the connection without an answer, unaccepted
    ghost_rate: float = 0.0  # ACCEPT and record, then drop the connection: the "unknown" outcome
    rate_limit: float | None = None  # accepted requests per second; None: unlimited
    burst: float | None = None  # bucket size; default max(1, rate_limit)

    def validate(self, where: str) -> None:
        for name in ("error_rate", "timeout_rate", "drop_rate", "ghost_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}.{name} must be within [0, 1], got {value}")
        if self.error_rate + self.timeout_rate + self.drop_rate + self.ghost_rate > 1.0 + 1e-9:
            raise ConfigError(f"{where}: fault rates add up to more than 1")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ConfigError(f"{where}: latency must not be negative")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ConfigError(f"{where}.rate_limit must be positive (or null for unlimited)")
        if self.burst is not None and self.burst < 1:
            raise ConfigError(f"{where}.burst must be at least 1")


@dataclass
class EngagementRates:
    """Probabilities of what a simulated recipient does with an accepted message.

    ``delivered`` is P(delivered | accepted) (else a hard bounce, an undelivered SMS, or no push receipt);
    ``opened`` is P(open | delivered) (email open, push opened; unused for SMS); ``clicked`` is
    P(click | opened) (email); ``unsubscribed`` is P(unsubscribe | delivered): the email unsubscribe
    link, an SMS STOP reply, or uninstalling the app (the token becomes unregistered); ``complained`` is
    P(spam report | delivered) (email).
    """

    delivered: float = 1.0
    opened: float = 0.0
    clicked: float = 0.0
    unsubscribed: float = 0.0
    complained: float = 0.0

    def validate(self, where: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}.{f.name} must be within [0, 1], got {value}")


def default_engagement() -> dict[str, EngagementRates]:
    # Plausible retail figures; tests and benchmarks set their own.
    return {
        "email": EngagementRates(delivered=0.98, opened=0.25, clicked=0.12, unsubscribed=0.003, complained=0.0005),
        "sms": EngagementRates(delivered=0.97, unsubscribed=0.01),
        "push": EngagementRates(delivered=0.92, opened=0.08, unsubscribed=0.01),
    }


@dataclass
class EngagementRule:
    """Override rates for recipients whose attributes match every ``match`` entry.

    Attributes of a recipient: ``channel``, ``domain`` (email), ``country`` (SMS, ISO region of the
    number), ``category`` (each SendGrid category), and every custom arg / FCM data key / status-callback
    query parameter our adapters or the engine put into the request (e.g. a member tier). Values compare
    as strings; ``"*"`` matches any present value. The first matching rule wins.
    """

    match: dict[str, str] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        known = {f.name for f in dataclasses.fields(EngagementRates)}
        for key, value in self.rates.items():
            if key not in known:
                raise ConfigError(f"{where}.rates: unknown rate {key!r} (known: {', '.join(sorted(known))})")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{where}.rates.{key} must be within [0, 1]")


@dataclass
class SandboxConfig:
    seed: int = 0
    email: ChannelBehaviour = field(default_factory=ChannelBehaviour)
    sms: ChannelBehaviour = field(default_factory=ChannelBehaviour)
    push: ChannelBehaviour = field(default_factory=ChannelBehaviour)
    timeout_hold_s: float = 30.0

    # Credentials the sandbox accepts. Empty: any non-empty credential is accepted.
    sendgrid_api_keys: list[str] = field(default_factory=list)
    twilio_accounts: dict[str, str] = field(default_factory=dict)  # AccountSid -> auth token
    # client_email -> PEM public key: when present, JWT assertions of that service account are verified.
    fcm_service_accounts: dict[str, str] = field(default_factory=dict)
    fcm_require_known_service_account: bool = False

    # Provider-side recipient state.
    twilio_opted_out: list[str] = field(default_factory=list)  # numbers that replied STOP
    fcm_unregistered_tokens: list[str] = field(default_factory=list)
    fcm_stale_prefix: str = "stale-"  # tokens starting with this are UNREGISTERED

    # Keep the raw bodies of the last N provider requests (contract tests); 0: keep none.
    capture_requests: int = 0

    # Simulated recipients: where the project's webhook receiver listens.
    webhook_url: str | None = None  # base URL; endpoints below default to its standard paths
    sendgrid_webhook_url: str | None = None  # default {webhook_url}/webhooks/sendgrid
    twilio_inbound_url: str | None = None  # default {webhook_url}/webhooks/twilio/inbound
    push_tracking_url: str | None = None  # default {webhook_url}/track/push
    push_tracking_secret: str | None = None
    engagement: dict[str, EngagementRates] = field(default_factory=default_engagement)
    engagement_rules: list[EngagementRule] = field(default_factory=list)
    engagement_delay_ms: float = 0.0  # before a message's first event
    sendgrid_batch_size: int = 1000  # SendGrid posts up to about a thousand events per request
    sendgrid_batch_interval_ms: float = 200.0
    webhook_max_attempts: int = 6
    webhook_retry_base_ms: float = 200.0
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 32

    def behaviour(self, channel: str) -> ChannelBehaviour:
        return getattr(self, channel)

    def endpoint(self, kind: str) -> str | None:
        explicit = {"sendgrid": self.sendgrid_webhook_url, "twilio_inbound": self.twilio_inbound_url,
                    "push": self.push_tracking_url}[kind]
        if explicit:
            return explicit
        if not self.webhook_url:
            return None
        path = {"sendgrid": "/webhooks/sendgrid", "twilio_inbound": "/webhooks/twilio/inbound",
                "push": "/track/push"}[kind]
        return self.webhook_url.rstrip("/") + path

    def validate(self) -> SandboxConfig:
        for channel in CHANNELS:
            self.behaviour(channel).validate(channel)
        for channel, rates in self.engagement.items():
            if channel not in CHANNELS:
                raise ConfigError(f"engagement: unknown channel {channel!r}")
            rates.validate(f"engagement.{channel}")
        for i, rule in enumerate(self.engagement_rules):
            rule.validate(f"engagement_rules[{i}]")
        if self.timeout_hold_s <= 0 or self.capture_requests < 0:
            raise ConfigError("timeout_hold_s must be positive and capture_requests not negative")
        if not 1 <= self.sendgrid_batch_size <= 10_000 or self.webhook_max_attempts < 1 or self.webhook_concurrency < 1:
            raise ConfigError("sendgrid_batch_size, webhook_max_attempts and webhook_concurrency must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["twilio_accounts"] = {sid: "***" for sid in self.twilio_accounts}  # never echo secrets
        if self.push_tracking_secret:
            data["push_tracking_secret"] = "***"
        return data


def _build(cls, data: Any, where: str):
    """Construct dataclass ``cls`` from a dict, refusing unknown keys."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown setting(s) {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(cls, name, value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _convert(cls, name: str, value: Any, where: str):  # noqa: C901 - a table: one branch per setting type
    """The setting ``name`` of ``cls`` from its JSON ``value``, checked against the type of its default."""
    default = _default_of(cls, name)
    if isinstance(default, (ChannelBehaviour, EngagementRates, EngagementRule)):
        return _build(type(default), value, where)
    if name == "engagement":
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object of channel -> rates")
        return {ch: _build(EngagementRates, v, f"{where}.{ch}") for ch, v in value.items()}
    if name == "engagement_rules":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_build(EngagementRule, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None:
        if default is None or name in ("rate_limit", "burst"):
            return None
        raise ConfigError(f"{where} must not be null")
    if isinstance(default, bool) or name.startswith("fcm_require"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool) and name not in ("latency_ms",):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer")
        return value
    if isinstance(default, float) or name in ("rate_limit", "burst"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number")
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
            raise ConfigError(f"{where} must be an object of strings")
        return {str(k): (v if isinstance(v, str) else v) for k, v in value.items()}
    if default is None or isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    raise ConfigError(f"{where}: unsupported setting")


def _default_of(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_from_dict(data: dict[str, Any]) -> SandboxConfig:
    return _build(SandboxConfig, data, "").validate()


def apply_patch(config: SandboxConfig, patch: dict[str, Any]) -> SandboxConfig:
    """A new config: ``config`` with ``patch`` merged in (objects merge key by key; lists are replaced)."""
    if not isinstance(patch, dict):
        raise ConfigError("the config patch must be a JSON object")
    merged = dataclasses.asdict(copy.deepcopy(config))
    _merge(merged, patch, "")
    return config_from_dict(merged)


def _merge(into: dict, patch: dict, where: str) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in ("match", "rates"):
            _merge(into[key], value, f"{where}{key}.")
        else:
            into[key] = value


_RATE = re.compile(r"^\s*(email|sms|push)\s*=\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*$")


def parse_rate_limit(spec: str) -> tuple[str, float]:
    """``"sms=10/s"`` -> ``("sms", 10.0)``; ``"email=600/min"`` -> ``("email", 10.0)``."""
    m = _RATE.match(spec)
    if not m:
        raise ConfigError(f"bad rate limit {spec!r}: use CHANNEL=N/s or CHANNEL=N/min, "
                          f"CHANNEL one of {', '.join(CHANNELS)}")
    rate = float(m.group(2))
    if m.group(3) and m.group(3).startswith("m"):
        rate /= 60.0
    if rate <= 0:
        raise ConfigError(f"bad rate limit {spec!r}: must be positive")
    return m.group(1), rate
