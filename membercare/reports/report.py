"""A campaign report: every section computed with SQL aggregates over one period.

Nothing here loads events or orders into Python: every figure is a ``GROUP BY`` in the database, and Python
only shapes the (few) result rows and runs the lift statistics on their sums. One module per section:
:mod:`~membercare.reports.funnel`, :mod:`~membercare.reports.lift` (holdout and programme),
:mod:`~membercare.reports.variants`, :mod:`~membercare.reports.frequency`, :mod:`~membercare.reports.kpis`
and :mod:`~membercare.reports.trends`; the definitions are in ``docs/reports.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy.engine import Engine

from membercare.engagement.attribution import AttributionResult, compute_attributions
from membercare.reports.frequency import FrequencySection, frequency_section
from membercare.reports.funnel import FunnelRow, funnel_rows
from membercare.reports.journeys import JourneySection, journey_sections
from membercare.reports.kpis import Kpis, kpis
from membercare.reports.lift import HoldoutRow, ProgrammeLift, holdout_rows, programme_lift
from membercare.reports.options import ReportOptions
from membercare.reports.sms import refresh_sms_segments
from membercare.reports.trends import TrendPoint, trends
from membercare.reports.variants import VariantSection, variant_sections
from membercare.timeutil import utcnow


@dataclass
class Report:
    options: ReportOptions
    generated_at: datetime
    funnel: list[FunnelRow]
    totals: FunnelRow
    holdouts: list[HoldoutRow]
    kpis: Kpis
    trends: list[TrendPoint]
    attribution: AttributionResult | None = None
    variants: list[VariantSection] = field(default_factory=list)
    frequency: FrequencySection | None = None
    programme: ProgrammeLift | None = None
    journeys: list[JourneySection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return _jsonable({
            "since": o.since, "until": o.until, "campaign": o.campaign, "granularity": o.granularity,
            "timezone": o.timezone, "currency": o.currency, "generated_at": self.generated_at,
            "attribution": {"model": o.attribution.model.value, "window_seconds": o.attribution.window_seconds,
                            "touch": {k: v.value for k, v in o.attribution.touch.items()}},
            "funnel": [asdict(r) for r in self.funnel], "totals": asdict(self.totals),
            "holdouts": [asdict(h) for h in self.holdouts], "kpis": asdict(self.kpis),
            "trends": [asdict(t) for t in self.trends],
            "variants": [asdict(v) for v in self.variants],
            "frequency": asdict(self.frequency) if self.frequency else None,
            "programme": asdict(self.programme) if self.programme else None,
            "journeys": [asdict(j) for j in self.journeys],
        })


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value



def build_report(engine: Engine, options: ReportOptions) -> Report:
    """Refresh the derived tables (unless ``options.refresh`` is off) and compute every section."""
    attribution = None
    if options.refresh:
        # Conversions up to one window after the range can still be credited to its messages.
        end = min(options.until + options.attribution.window, max(utcnow(), options.until))
        attribution = compute_attributions(engine, options.since, end, options.attribution)
        refresh_sms_segments(engine)
    with engine.connect() as conn:
        funnel = funnel_rows(conn, options)
        totals = FunnelRow(campaign="all", segment=None, channel="all")
        for row in funnel:
            totals.add(row)
        return Report(options=options, generated_at=utcnow(), funnel=funnel, totals=totals,
                      holdouts=holdout_rows(conn, options), kpis=kpis(conn, options),
                      trends=trends(conn, options), attribution=attribution,
                      variants=variant_sections(conn, options), frequency=frequency_section(conn, options),
                      programme=programme_lift(conn, options), journeys=journey_sections(conn, options))
