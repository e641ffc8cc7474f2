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
    auto_resume_after: 300  # optional: after a provider outage paused the run, probe again in 5 min
    approval: required      # optional: wait for approve/reject in the Prefect UI before sending
    channels: [push, email, sms]
    occurrence: daily       # the idempotency bucket: hourly|daily|weekly|monthly|once
    message_per: member     # member | coupon | order
    default_locale: zh-TW
    locales: [zh-TW, en]
    offer:
      kind: amount
      steps: [{min_spend_minor: 0, amount_minor: 20000}]
      valid_days: 30
    optimise:               # optional, all opt-in (see Optimise and docs/optimisation.md)
      routing: best_engagement      # preference (default) | best_engagement
      send_time: best_hour          # immediate (default) | best_hour
      variants: {names: [a, b], goal: click, floor: 0.05, promote_at: 0.95}
    recommendations:        # optional: restrict the templates' recommendations (see Recommendations)
      category: coffee      # or a list; never recommends outside it
      only: any             # any | new_arrivals | back_in_stock (within within_days of as_of)

Loading validates everything and reports errors with the file and the field.
"""

from __future__ import annotations

import re
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


DEFAULT_VALID_FOR_DAYS = 3


class Trigger(BaseModel):
    """For campaigns started by an event (e.g. a bad review) rather than a scheduled segment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event: str = Field(pattern=r"^[a-z][a-z0-9_.]*$")
    delay_days: int = Field(default=0, ge=0)
    # How long after its due time (event + delay_days) the message is still worth sending: an event reported
    # later than that (an order delivered 53 days ago, a review found a month late) is skipped with this
    # reason instead of sending a "7 days after delivery" message at once.
    valid_for_days: int = Field(default=DEFAULT_VALID_FOR_DAYS, ge=0, le=365)


class OfferStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_spend_minor: int = Field(ge=0, description="trailing-365-day spend at or above which this step applies")
    amount_minor: int | None = Field(default=None, gt=0)
    percent_off: int | None = Field(default=None, gt=0, le=100)
    label: str | None = None

    @model_validator(mode="after")
    def _one_value(self) -> OfferStep:
        if (self.amount_minor is None) == (self.percent_off is None):
            raise ValueError("give exactly one of amount_minor or percent_off")
        return self


class CltvTier(BaseModel):
    """One tier of an offer sized by CLTV: members whose expected residual value is at least ``min_cltv_minor``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_cltv_minor: int = Field(ge=0, description="expected residual lifetime value at or above which this applies")
    amount_minor: int | None = Field(default=None, gt=0)
    percent_off: int | None = Field(default=None, gt=0, le=100)
    label: str | None = None

    @model_validator(mode="after")
    def _one_value(self) -> CltvTier:
        if (self.amount_minor is None) == (self.percent_off is None):
            raise ValueError("give exactly one of amount_minor or percent_off")
        return self


class Offer(BaseModel):
    """A coupon offer scaled to the member's value.

    ``size_by: spend`` (the default): the step with the highest ``min_spend_minor`` not above the member's
    trailing 365-day spend applies (:meth:`for_spend`). ``size_by: cltv``: the tier with the highest
    ``min_cltv_minor`` not above the member's discounted expected residual lifetime value at the run's as_of
    (``cltv_months`` ahead, ``cltv_discount`` a year; :mod:`membercare.lifetime_value`, fitted once per run) applies
    (:meth:`for_cltv`); members without a purchase get the first tier. Templates get the chosen step as ``offer``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: CouponKind
    size_by: Literal["spend", "cltv"] = "spend"
    steps: tuple[OfferStep, ...] = ()
    tiers: tuple[CltvTier, ...] = ()
    cltv_months: int = Field(default=12, ge=1, le=120)
    cltv_discount: float = Field(default=0.10, ge=0.0, le=1.0)
    valid_days: int = Field(default=14, gt=0, le=366)
    min_spend_minor: int = Field(default=0, ge=0, description="minimum order value to redeem")
    currency: str = Field(default="TWD", pattern=r"^[A-Z]{3}$")

    @model_validator(mode="after")
    def _consistent(self) -> Offer:
        if self.size_by == "spend" and (not self.steps or self.tiers):
            raise ValueError("an offer sized by spend needs steps (and no tiers)")
        if self.size_by == "cltv" and (not self.tiers or self.steps):
            raise ValueError("an offer sized by cltv needs tiers (and no steps)")
        values: list[OfferStep | CltvTier] = [*self.steps, *self.tiers]
        for s in values:
            if (self.kind == CouponKind.AMOUNT) != (s.amount_minor is not None):
                raise ValueError(f"offer kind is {self.kind.value} but a step gives the other value")
        for what, mins in (("steps", [s.min_spend_minor for s in self.steps]),
                           ("tiers", [t.min_cltv_minor for t in self.tiers])):
            if not mins:
                continue
            field_name = "min_spend_minor" if what == "steps" else "min_cltv_minor"
            if mins != sorted(mins) or len(set(mins)) != len(mins):
                raise ValueError(f"offer {what} must be sorted by strictly increasing {field_name}")
            if mins[0] != 0:
                raise ValueError(f"the first offer {what[:-1]} must start at {field_name}: 0")
        return self

    def for_spend(self, spend_minor: int) -> OfferStep | CltvTier:
        """The step for a trailing 365-day spend (an offer sized by CLTV: its first tier, the no-history one)."""
        if self.size_by == "cltv":
            return self.tiers[0]
        chosen = self.steps[0]
        for s in self.steps:
            if spend_minor >= s.min_spend_minor:
                chosen = s
        return chosen

    def for_cltv(self, value_minor: float) -> CltvTier:
        """The tier for an expected residual lifetime value (minor units)."""
        chosen = self.tiers[0]
        for t in self.tiers:
            if value_minor >= t.min_cltv_minor:
                chosen = t
        return chosen


class SmsRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_segments: int = Field(default=2, ge=1, le=10)


class PushRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # What lock screens show without truncation (iOS shows about 4 lines of body).
    title_max: int = Field(default=50, ge=10, le=200)
    body_max: int = Field(default=178, ge=20, le=1000)


VARIANT_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,15}$"
# Names the planner uses for control rows (outbox_messages.variant); a template variant may not take them.
RESERVED_VARIANT_NAMES = frozenset({"holdout", "global_control"})


class VariantTest(BaseModel):
    """An A/B/n test of template variants (``optimise.variants``), allocated by a Thompson-sampling bandit.

    The first name is the control (the default copy). A variant's template files are
    ``<part>@<variant>.<locale>.<ext>``; a part a variant does not override falls back to the plain file.
    See ``docs/optimisation.md`` for the allocation between runs and winner promotion.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    names: tuple[str, ...] = Field(min_length=2, max_length=8, description="variant names; the first is the control")
    goal: Literal["click", "conversion"] = Field(default="click", description="what the bandit maximises per message")
    floor: float = Field(default=0.05, ge=0.0, le=0.5, description="minimum share per variant until a winner")
    promote_at: float = Field(default=0.95, gt=0.5, le=1.0,
                              description="1 - false-winner rate of the sequential promotion test "
                                          "(0.95: at most 5 % in an A/A test; 1.0 never promotes)")

    @field_validator("names")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for n in v:
            if not re.match(VARIANT_NAME_PATTERN, n):
                raise ValueError(f"variant name {n!r} must be 1-16 lower-case letters, digits or '_', "
                                 f"starting with a letter")
            if n in RESERVED_VARIANT_NAMES:
                raise ValueError(f"variant name {n!r} is reserved for control rows")
        if len(set(v)) != len(v):
            raise ValueError("variant names are listed twice")
        return v

    @model_validator(mode="after")
    def _floor(self) -> VariantTest:
        if self.floor > 1.0 / len(self.names):
            raise ValueError(f"floor {self.floor} is impossible with {len(self.names)} variants "
                             f"(at most 1/{len(self.names)} = {1.0 / len(self.names):.4f})")
        return self

    @property
    def control(self) -> str:
        return self.names[0]


class Recommendations(BaseModel):
    """What the ``recommendations`` of the campaign's templates may contain (``recommendations:`` block).

    ``category``: one category or a list (``order_lines.category`` / ``products.category`` values); the
    recommendations never leave it. ``only``: ``any`` (default), ``new_arrivals`` (products that arrived within
    ``within_days`` before the run's as_of) or ``back_in_stock`` (restocked within ``within_days``). Out-of-stock
    products (``stock`` 0) are never recommended. The ranking and its fall-backs are in docs/campaigns.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    category: tuple[str, ...] = ()
    only: Literal["any", "new_arrivals", "back_in_stock"] = "any"
    within_days: int = Field(default=14, ge=1, le=365)

    @field_validator("category", mode="before")
    @classmethod
    def _categories(cls, v: Any) -> Any:
        items = v if isinstance(v, list | tuple) else [v]
        out = []
        for c in items:
            if not isinstance(c, str) or not c.strip() or len(c.strip()) > 64:
                raise ValueError(f"category {c!r} must be a non-empty text of at most 64 characters")
            out.append(c.strip())
        if len(set(out)) != len(out):
            raise ValueError("a category is listed twice")
        return tuple(out)


class Optimise(BaseModel):
    """The campaign's ``optimise:`` block: opt-in optimisation strategies applied at planning time.

    ``routing``: ``preference`` (default: the member's stated channel order) or ``best_engagement``
    (the consented, reachable channel most likely to engage this member, from engagement history).
    ``send_time``: ``immediate`` (default), ``best_hour`` (deliver within the next 24 h at the
    member's best local hour from their engagement hours, outside quiet hours) or ``causal_hour`` (the hour
    at which messages *sent* to the member's group engaged most, inverse-propensity weighted).
    ``explore``: the share of channel and send-hour decisions drawn at random among the eligible ones
    (logged with their probability; see docs/optimisation.md). ``variants``: an optional :class:`VariantTest`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    routing: Literal["preference", "best_engagement"] = "preference"
    send_time: Literal["immediate", "best_hour", "causal_hour"] = "immediate"
    explore: float = Field(default=0.0, ge=0.0, le=0.5)
    variants: VariantTest | None = None

    @property
    def is_default(self) -> bool:
        return (self.routing == "preference" and self.send_time == "immediate" and self.variants is None
                and self.explore == 0.0)


class Campaign(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(min_length=1)
    purpose: Purpose
    segment: SegmentRef | None = None
    trigger: Trigger | None = None
    priority: int = Field(default=50, ge=0, le=1000, description="higher wins under the frequency cap")
    # After the error budget paused a run (a provider outage): resume by itself after this many seconds,
    # doubling each time (see docs/delivery.md). Unset: an operator resumes it.
    auto_resume_after: int | None = Field(default=None, ge=10, le=86_400)
    # "required": the run-campaign flow plans in memory, publishes the dry-run summary, and waits for an
    # approve/reject decision in the Prefect UI before it plans or sends anything (docs/campaigns.md).
    approval: Literal["none", "required"] = "none"
    channels: tuple[Channel, ...] = Field(min_length=1,
                                          description="allowed channels, in the campaign's preference order")
    occurrence: Literal["hourly", "daily", "weekly", "monthly", "once"] = "daily"
    message_per: Literal["member", "coupon", "order"] = "member"
    default_locale: str = "zh-TW"
    locales: tuple[str, ...] = ("zh-TW", "en")
    utm_campaign: str | None = None
    offer: Offer | None = None
    sms: SmsRules = Field(default_factory=SmsRules)
    push: PushRules = Field(default_factory=PushRules)
    # Tracked short links: every http(s) link of an SMS and a LINE message (text and Flex URI actions) becomes
    # MEMBERCARE_PUBLIC_URL/r/<signed token>; `membercare serve` redirects it and records the click of that
    # message. SMS segments are counted on the shortened text.
    short_links: bool = False
    # Free-form knobs for the templates (e.g. how many recommendations to show).
    params: dict[str, Any] = Field(default_factory=dict)
    # Which products the templates' recommendations may name: a category, new arrivals, back in stock.
    recommendations: Recommendations = Field(default_factory=Recommendations)
    # Opt-in optimisation: routing strategy, send time, variant test (see Optimise).
    optimise: Optimise = Field(default_factory=Optimise)
    # The metric its holdout verdict rests on, declared before the test (docs/reports.md); the others are secondary.
    primary_metric: Literal["conversion", "visit", "revenue"] = "conversion"
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
    def _checks(self) -> Campaign:
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


__all__ = [
    "CAMPAIGN_FILE", "NAME_PATTERN", "RESERVED_VARIANT_NAMES", "VARIANT_NAME_PATTERN", "Campaign",
    "CampaignDefinitionError", "CltvTier", "Offer", "OfferStep", "Optimise", "PushRules", "Recommendations",
    "SegmentRef", "SmsRules", "Trigger", "VariantTest", "campaign_names", "list_campaigns", "load_campaign",
    "parse_campaign",
]
