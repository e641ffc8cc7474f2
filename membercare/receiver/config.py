"""Configuration of the webhook receiver: an explicit object, read from the environment once.

=========================================  ==============================================================
variable                                   meaning
=========================================  ==============================================================
``MEMBERCARE_PUBLIC_URL``                  the externally visible base URL of the receiver (what
                                           providers call and links point at); Twilio signatures are
                                           checked against it, so it must match exactly, scheme included
``MEMBERCARE_SECRET_KEY``                  signs and verifies member links (``/u/{token}``)
``MEMBERCARE_SECRET_KEY_PREVIOUS``         optional, comma-separated: older keys still accepted during a
                                           rotation
``MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY`` SendGrid's verification key (base64 DER, as shown by SendGrid)
``MEMBERCARE_TWILIO_AUTH_TOKEN``           the Twilio account's auth token
``MEMBERCARE_PUSH_TRACKING_SECRET``        shared secret of the shop's app for ``/track/push``
(each provider's ``webhook_secret_env``)   the webhook secret of every other registered provider
``MEMBERCARE_WEBHOOK_TOLERANCE_S``         accepted clock difference for signed timestamps (default 300)
``MEMBERCARE_PUSH_MAX_AGE_S``              oldest app report accepted (default 259200 = 3 days: apps
                                           queue reports while offline)
``MEMBERCARE_SHOP_NAME``                   shown on the preference page and in SMS help replies
``MEMBERCARE_SUPPORT_CONTACT``             optional; added to SMS help replies (e.g. a phone number)
``MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN``   LINE's channel access token: the account-link prompt (link
                                           tokens, the login link); without it nobody is prompted
``MEMBERCARE_LINE_BASE_URL``               optional; the Messaging API (tests: the provider sandbox)
``MEMBERCARE_LINE_LOGIN_URL``              the shop's login page the prompt links to (``?linkToken=``)
``MEMBERCARE_LINE_ACCOUNT_LINK_URL``       optional; LINE's account-link dialog (default
                                           ``https://access.line.me/dialog/bot/accountLink``)
``MEMBERCARE_LINE_LINK_TTL_S``             how long a link nonce is valid (default 600)
=========================================  ==============================================================

Webhook secrets are per provider (``channels.registry``): each provider names its variable
(``webhook_secret_env``) and checks the value at start-up (``check_webhook_secret``). The three shipped
providers' secrets keep their own fields (``sendgrid_public_key``, ``twilio_auth_token``,
``push_tracking_secret``); any other provider's is in ``webhook_secrets``, keyed by provider name.

An endpoint whose secret is not configured answers 503 to everything (it can verify nothing, and a
5xx makes the provider retry later instead of dropping events); ``membercare serve`` says so at start-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from channels.registry import PROVIDERS, get_provider
from membercare.errors import ConfigurationError
from membercare.links import DEFAULT_PUBLIC_URL, PREVIEW_SECRET

# The shipped providers' webhook secrets have fields of their own (callers set them by these names).
NAMED_SECRETS = {"sendgrid": "sendgrid_public_key", "twilio": "twilio_auth_token", "fcm": "push_tracking_secret"}


@dataclass(frozen=True)
class ReceiverConfig:
    public_url: str = DEFAULT_PUBLIC_URL
    secret_key: str = ""
    previous_secret_keys: tuple[str, ...] = ()
    sendgrid_public_key: str | None = None
    twilio_auth_token: str | None = None
    push_tracking_secret: str | None = None
    # Webhook secrets of the other registered providers: ((provider name, secret), ...).
    webhook_secrets: tuple[tuple[str, str], ...] = ()
    # HMAC secret of POST /triggers/{event} (event-triggered messages); unset disables the endpoint.
    trigger_secret: str | None = None
    signature_tolerance_s: float = 300.0
    push_max_age_s: float = 3 * 24 * 3600.0
    # SendGrid batches are ~1000 events of ~1 KB; 16 MiB leaves room without letting a client exhaust memory.
    max_body_bytes: int = 16 * 1024 * 1024
    shop_name: str = "membercare"
    # Per-locale shop names (from templates/_layout/shop.yaml); ``shop_name`` is the fallback.
    shop_names: tuple[tuple[str, str], ...] = ()
    shop_locale: str = "zh-TW"
    support_contact: str | None = None
    # LINE account link (membercare/receiver/line_link.py).
    line_access_token: str | None = field(default=None, repr=False)
    line_base_url: str | None = None
    line_login_url: str | None = None
    line_account_link_url: str = "https://access.line.me/dialog/bot/accountLink"
    line_link_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_url", (self.public_url or DEFAULT_PUBLIC_URL).rstrip("/"))
        if not self.public_url.startswith(("http://", "https://")):
            raise ConfigurationError("MEMBERCARE_PUBLIC_URL must be an http(s) URL, e.g. https://shop.example/mc")
        if self.secret_key == PREVIEW_SECRET or PREVIEW_SECRET in self.previous_secret_keys:
            raise ConfigurationError("MEMBERCARE_SECRET_KEY is the preview secret: set a real, random secret")
        if self.signature_tolerance_s <= 0 or self.push_max_age_s <= 0:
            raise ConfigurationError("webhook tolerances must be positive")
        if not 0 < self.line_link_ttl_s <= 3600:
            raise ConfigurationError("MEMBERCARE_LINE_LINK_TTL_S must be between 1 and 3600 seconds")
        for name, url in (("MEMBERCARE_LINE_LOGIN_URL", self.line_login_url),
                          ("MEMBERCARE_LINE_ACCOUNT_LINK_URL", self.line_account_link_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigurationError(f"{name} must be an http(s) URL")
        for name, _secret in self.webhook_secrets:
            if name in NAMED_SECRETS:
                raise ConfigurationError(f"the {name} webhook secret is set with {NAMED_SECRETS[name]}=")
            get_provider(name)
        for provider in PROVIDERS.values():
            secret = self.webhook_secret(provider.name)
            if secret:
                provider.check_webhook_secret(secret)

    def webhook_secret(self, provider: str) -> str | None:
        """The secret that authenticates ``provider``'s webhooks, or ``None`` (its endpoints answer 503)."""
        named = NAMED_SECRETS.get(provider)
        if named:
            return getattr(self, named)
        return dict(self.webhook_secrets).get(provider)

    def shop_name_for(self, locale: str) -> str:
        names = dict(self.shop_names)
        return names.get(locale) or names.get(locale.split("-")[0]) or self.shop_name

    @property
    def link_secrets(self) -> list[str]:
        return [s for s in (self.secret_key, *self.previous_secret_keys) if s]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, settings: Any = None) -> ReceiverConfig:
        env = os.environ if env is None else env

        def opt(name: str) -> str | None:
            value = (env.get(name) or "").strip()
            return value or None

        def num(name: str, default: float) -> float:
            value = opt(name)
            if value is None:
                return default
            try:
                return float(value)
            except ValueError:
                raise ConfigurationError(f"{name} must be a number of seconds") from None

        shop = _shop_facts(getattr(settings, "templates_dir", None))
        names = shop.get("name")
        shop_names = tuple(sorted((str(k), str(v)) for k, v in names.items())) if isinstance(names, dict) else ()
        default_name = names if isinstance(names, str) else None
        support = shop.get("support_phone") or shop.get("support_email")
        secrets = {p.name: opt(p.webhook_secret_env) for p in PROVIDERS.values() if p.webhook_secret_env}
        named: dict[str, Any] = {field: secrets.get(name) for name, field in NAMED_SECRETS.items()}
        cfg = cls(
            public_url=opt("MEMBERCARE_PUBLIC_URL") or DEFAULT_PUBLIC_URL,
            secret_key=opt("MEMBERCARE_SECRET_KEY") or "",
            previous_secret_keys=tuple(p.strip() for p in (opt("MEMBERCARE_SECRET_KEY_PREVIOUS") or "").split(",")
                                       if p.strip()),
            **named,
            webhook_secrets=tuple(sorted((name, secret) for name, secret in secrets.items()
                                         if secret and name not in NAMED_SECRETS)),
            trigger_secret=opt("MEMBERCARE_TRIGGER_SECRET"),
            signature_tolerance_s=num("MEMBERCARE_WEBHOOK_TOLERANCE_S", 300.0),
            push_max_age_s=num("MEMBERCARE_PUSH_MAX_AGE_S", 3 * 24 * 3600.0),
            shop_name=opt("MEMBERCARE_SHOP_NAME") or default_name or "membercare",
            shop_names=() if opt("MEMBERCARE_SHOP_NAME") else shop_names,
            shop_locale=opt("MEMBERCARE_SHOP_LOCALE") or getattr(settings, "shop_locale", None) or "zh-TW",
            support_contact=opt("MEMBERCARE_SUPPORT_CONTACT") or (str(support) if support else None),
            line_access_token=opt("MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN"),
            line_base_url=opt("MEMBERCARE_LINE_BASE_URL"),
            line_login_url=opt("MEMBERCARE_LINE_LOGIN_URL"),
            line_account_link_url=opt("MEMBERCARE_LINE_ACCOUNT_LINK_URL") or cls.line_account_link_url,
            line_link_ttl_s=num("MEMBERCARE_LINE_LINK_TTL_S", 600.0),
        )
        return cfg

    def with_(self, **changes: Any) -> ReceiverConfig:
        return replace(self, **changes)

    def disabled_endpoints(self) -> list[str]:
        """Endpoints that will answer 503 because their secret is missing (for the start-up message)."""
        missing = []
        for provider in PROVIDERS.values():
            paths = [webhook.path for webhook in provider.webhooks()]
            if paths and not self.webhook_secret(provider.name):
                where = paths[0] if len(paths) == 1 else os.path.commonprefix(paths) + "*"
                missing.append(f"{where} ({provider.webhook_secret_env})")
        if not self.secret_key:
            missing.append("/u/{token} (MEMBERCARE_SECRET_KEY)")
        return missing


def _shop_facts(templates_dir) -> dict:
    """The shop facts the templates use (name per locale, support contact), if the folder has them."""
    if templates_dir is None:
        return {}
    from pathlib import Path

    import yaml

    path = Path(templates_dir) / "_layout" / "shop.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        logging.getLogger(__name__).warning("%s unreadable (%s): pages show no shop facts", path, type(exc).__name__)
        return {}
    return data if isinstance(data, dict) else {}
