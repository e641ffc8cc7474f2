"""Campaign definitions: ``templates/<campaign>/campaign.yaml``.

A campaign is what marketing launches: who (a segment name and its parameters, defined in
``segments/``; this module only stores them), why (``purpose``: marketing or transactional, which
decides consent and the opt-out/unsubscribe furniture), on which channels, how often a member may
get it (``occurrence``, the time bucket of the idempotency key), and how it ranks against other
campaigns under the frequency cap (``priority``, higher wins). The words live next to it in the
per-channel, per-locale template files (see ``docs/templates.md``).

Example::

    name: birthday
    description: Birthday greeting with a birthday coupon.
    purpose: marketing
    segment: {name: birthday_today}
    priority: 80
    channels: [push, email, sms]
    occurrence: daily       # the idempotency bucket: hourly|daily|weekly|monthly|once
    message_per: member     # member | coupon | order
    default_locale: zh-TW
    locales: [zh-TW, en]
    offer:
      kind: amount
      steps: [{min_spend_minor: 0, amount_minor: 20000}]
      valid_days: 30

Loading validates everything and reports errors with the file and the field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from membercare.config import Settings
from membercare.errors import InputError, UnknownNameError
from membercare.models import Channel, CouponKind, Purpose

CAMPAIGN_FILE = "campaign.yaml"
NAME_PATTERN = r"^[a-z][a-z0-9_]{1,62}$"


class CampaignDefinitionError(InputError):
    """A ``campaign.yaml`` that does not parse or validate."""


class SegmentRef(BaseModel):
    """A segment by name with its parameters; resolved by ``segments/`` at run time."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    params: dict[str, Any] = Field(default_factory=dict)


class Trigger(BaseModel):
    """For campaigns started by an event (e.g. a bad review) rather than a scheduled segment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event: str = Field(pattern=r"^[a-z][a-z0-9_.]*$")
    delay_days: int = Field(default=0, ge=0)


class OfferStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_spend_minor: int = Field(ge=0, description="trailing-365-day spend at or above which this step applies")
    amount_minor: int | None = Field(default=None, gt=0)
    percent_off: int | None = Field(default=None, gt=0, le=100)
    label: str | None = None

    @model_validator(mode="after")
    def _one_value(self) -> "OfferStep":
        if (self.amount_minor is None) == (self.percent_off is None):
            raise ValueError("give exactly one of amount_minor or percent_off")
        return self


class Offer(BaseModel):
    """A coupon offer scaled to the member's value (trailing 365-day spend).

    The step with the highest ``min_spend_minor`` not above the member's spend applies. The flow
    that issues coupons uses :meth:`for_spend`; templates get the chosen step as ``offer``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: CouponKind
    steps: tuple[OfferStep, ...] = Field(min_length=1)
    valid_days: int = Field(default=14, gt=0, le=366)
    min_spend_minor: int = Field(default=0, ge=0, description="minimum order value to redeem")
    currency: str = Field(default="TWD", pattern=r"^[A-Z]{3}$")

    @model_validator(mode="after")
    def _consistent(self) -> "Offer":
        for s in self.steps:
            if (self.kind == CouponKind.AMOUNT) != (s.amount_minor is not None):
                raise ValueError(f"offer kind is {self.kind.value} but a step gives the other value")
        mins = [s.min_spend_minor for s in self.steps]
        if mins != sorted(mins) or len(set(mins)) != len(mins):
            raise ValueError("offer steps must be sorted by strictly increasing min_spend_minor")
        if mins[0] != 0:
            raise ValueError("the first offer step must start at min_spend_minor: 0")
        return self

    def for_spend(self, spend_minor: int) -> OfferStep:
        chosen = self.steps[0]
        for s in self.steps:
            if spend_minor >= s.min_spend_minor:
                chosen = s
        return chosen


class SmsRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_segments: int = Field(default=2, ge=1, le=10)


class PushRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # What lock screens show without truncation (iOS shows about 4 lines of body).
    title_max: int = Field(default=50, ge=10, le=200)
    body_max: int = Field(default=178, ge=20, le=1000)


class Campaign(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(min_length=1)
    purpose: Purpose
    segment: SegmentRef | None = None
    trigger: Trigger | None = None
    priority: int = Field(default=50, ge=0, le=1000, description="higher wins under the frequency cap")
    channels: tuple[Channel, ...] = Field(min_length=1, description="allowed channels, in the campaign's preference order")
    occurrence: Literal["hourly", "daily", "weekly", "monthly", "once"] = "daily"
    message_per: Literal["member", "coupon", "order"] = "member"
    default_locale: str = "zh-TW"
    locales: tuple[str, ...] = ("zh-TW", "en")
    utm_campaign: str | None = None
    offer: Offer | None = None
    sms: SmsRules = Field(default_factory=SmsRules)
    push: PushRules = Field(default_factory=PushRules)
    # Free-form knobs for the templates (e.g. how many recommendations to show).
    params: dict[str, Any] = Field(default_factory=dict)
    directory: Path | None = Field(default=None, exclude=True)

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, v: tuple[Channel, ...]) -> tuple[Channel, ...]:
        if len(set(v)) != len(v):
            raise ValueError("channels are listed twice")
        return v

    @field_validator("locales")
    @classmethod
    def _locales(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from membercare.rendering.locales import normalise_locale

        return tuple(normalise_locale(x) for x in v)

    @model_validator(mode="after")
    def _checks(self) -> "Campaign":
        from membercare.rendering.locales import normalise_locale

        object.__setattr__(self, "default_locale", normalise_locale(self.default_locale))
        if self.default_locale not in self.locales:
            raise ValueError(f"default_locale {self.default_locale} is not in locales {list(self.locales)}")
        if (self.segment is None) == (self.trigger is None):
            raise ValueError("give exactly one of segment (scheduled) or trigger (event-driven)")
        return self

    @property
    def per_coupon(self) -> bool:
        """One message per coupon (the idempotency key includes the coupon)."""
        return self.message_per == "coupon"

    @property
    def is_marketing(self) -> bool:
        return self.purpose == Purpose.MARKETING

    @property
    def utm_name(self) -> str:
        return self.utm_campaign or self.name


def _templates_dir(settings: Settings | None) -> Path:
    return (settings or Settings.from_env()).templates_dir


def campaign_names(templates_dir: Path) -> list[str]:
    """Folders of ``templates_dir`` that hold a ``campaign.yaml`` (``_layout`` and the like are not campaigns)."""
    if not templates_dir.is_dir():
        return []
    return sorted(p.name for p in templates_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and (p / CAMPAIGN_FILE).is_file())


def _format_validation(path: Path, exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        parts.append(f"{where}: {e['msg']}")
    return f"{path}: " + "; ".join(parts)


def parse_campaign(path: Path) -> Campaign:
    """Read and validate one ``campaign.yaml``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CampaignDefinitionError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise CampaignDefinitionError(f"{path}: expected a mapping of campaign fields")
    folder = path.parent.name
    data.setdefault("name", folder)
    if data["name"] != folder:
        raise CampaignDefinitionError(f"{path}: name {data['name']!r} must match its folder {folder!r}")
    try:
        return Campaign.model_validate({**data, "directory": path.parent})
    except ValidationError as exc:
        raise CampaignDefinitionError(_format_validation(path, exc)) from None


@lru_cache(maxsize=256)
def _load_cached(path: Path, mtime_ns: int) -> Campaign:
    return parse_campaign(path)


def load_campaign(name: str, settings: Settings | None = None) -> Campaign:
    """The campaign ``name`` from the templates folder; :class:`UnknownNameError` if there is none."""
    root = _templates_dir(settings)
    path = root / name / CAMPAIGN_FILE
    if not name or "/" in name or name.startswith((".", "_")) or not path.is_file():
        raise UnknownNameError("campaign", name, campaign_names(root))
    return _load_cached(path.resolve(), path.stat().st_mtime_ns)


def list_campaigns(settings: Settings | None = None) -> list[Campaign]:
    """Every campaign of the templates folder, sorted by name. Raises on the first invalid one."""
    root = _templates_dir(settings)
    return [load_campaign(n, settings) for n in campaign_names(root)]
