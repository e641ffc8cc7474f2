"""What a report covers: the period, one campaign or all, the buckets of its trends, the attribution settings,
prices and the thresholds of its statistics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from membercare.engagement.attribution import AttributionSettings
from membercare.errors import InputError
from membercare.optimise.assignment import DEFAULT_HOLDOUT_RATE
from membercare.timeutil import ensure_utc

Granularity = Literal["day", "week"]


@dataclass(frozen=True)
class ReportOptions:
    """What to report on. ``segments`` maps a campaign to its segment name (from its definition)."""

    since: datetime
    until: datetime
    campaign: str | None = None
    granularity: Granularity = "day"
    timezone: str = "Asia/Taipei"
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    sms_price_minor: int = 0
    currency: str = "TWD"
    segments: Mapping[str, str] = field(default_factory=dict)
    refresh: bool = True  # recompute attributions and the SMS segment cache first
    active_days: int = 365
    default_lifetime_years: float = 3.0
    max_lifetime_years: float = 10.0
    min_buyers_for_retention: int = 30
    confidence: float = 0.95
    # Variant tests: campaign -> {"goal": "click"|"conversion", "floor": f, "promote_at": p} (campaign.yaml's
    # optimise.variants); campaigns not listed use the bandit's defaults (click, 5 %, 0.95).
    variant_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Frequency section: the ceilings of the weekly unsubscribe and complaint rates (per member-week) under
    # which a weekly message count counts as safe, and the buckets' lower edges.
    max_unsubscribe_rate: float = 0.005
    max_complaint_rate: float | None = 0.001
    frequency_edges: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    min_member_weeks: int = 100
    # campaign -> its pre-declared primary metric (conversion, visit or revenue; default conversion) and its
    # configured holdout rate (params.holdout_rate, else 10 %), see ReportOptions.campaign_fields. A campaign without
    # a definition (e.g. a loaded experiment) has no expected rate, so no sample-ratio check.
    primary_metrics: Mapping[str, str] = field(default_factory=dict)
    holdout_rates: Mapping[str, float] = field(default_factory=dict)
    # CUPED (``--cuped``): treated-vs-holdout conversion and revenue per member also shown adjusted for each member's
    # purchases in the ``cuped_pre_days`` before the run's as_of (membercare.reports.cuped).
    cuped: bool = False
    cuped_pre_days: int = 90
    # ``--cltv``: each holdout comparison's arms by expected residual lifetime value (membercare.reports.cltv),
    # evaluated at ``since`` over ``cltv_months`` with ``cltv_discount`` a year.
    cltv: bool = False
    cltv_months: int = 12
    cltv_discount: float = 0.10

    @staticmethod
    def campaign_fields(campaigns: Iterable[Any]) -> dict[str, Any]:
        """``primary_metrics`` and ``holdout_rates`` from campaign definitions (``primary_metric`` and
        ``params.holdout_rate``), as keyword arguments of ReportOptions."""
        campaigns = list(campaigns)
        return {"primary_metrics": {c.name: getattr(c, "primary_metric", "conversion") for c in campaigns},
                "holdout_rates": {c.name: float(DEFAULT_HOLDOUT_RATE if c.params.get("holdout_rate") is None
                                                else c.params["holdout_rate"])
                                  for c in campaigns if getattr(c, "is_marketing", False)}}

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", ensure_utc(self.since))
        object.__setattr__(self, "until", ensure_utc(self.until))
        if self.until <= self.since:
            raise InputError("--until must be after --since")
        if self.granularity not in ("day", "week"):
            raise InputError("granularity must be day or week")
        ZoneInfo(self.timezone)
        if not 1 <= self.cuped_pre_days <= 3660:
            raise InputError("the CUPED pre-period must be 1 to 3660 days")
