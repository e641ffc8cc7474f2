"""Campaign reports: funnel, holdout lift, variant tests, frequency, programme lift, shop KPIs and trends (SQL
aggregates), as text or offline HTML.

``build_report(engine, ReportOptions(...))`` returns a :class:`Report`; :func:`membercare.reports.html.write_html`
renders it as one self-contained HTML file with charts. Definitions: ``docs/reports.md``.
"""

from membercare.reports.core import (
    FrequencySection,
    FunnelRow,
    HoldoutRow,
    Kpis,
    ProgrammeLift,
    Report,
    ReportOptions,
    TrendPoint,
    VariantRow,
    VariantSection,
    build_report,
)

__all__ = ["FrequencySection", "FunnelRow", "HoldoutRow", "Kpis", "ProgrammeLift", "Report", "ReportOptions",
           "TrendPoint", "VariantRow", "VariantSection", "build_report"]
