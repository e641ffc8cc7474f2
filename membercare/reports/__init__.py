"""Campaign reports: funnel, holdout lift, shop KPIs and trends (SQL aggregates), as text or offline HTML.

``build_report(engine, ReportOptions(...))`` returns a :class:`Report`; :func:`membercare.reports.html.write_html`
renders it as one self-contained HTML file with charts. Definitions: ``docs/reports.md``.
"""

from membercare.reports.core import (
    FunnelRow,
    HoldoutRow,
    Kpis,
    Report,
    ReportOptions,
    TrendPoint,
    build_report,
)

__all__ = ["FunnelRow", "HoldoutRow", "Kpis", "Report", "ReportOptions", "TrendPoint", "build_report"]
