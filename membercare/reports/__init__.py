"""Campaign reports: funnel, holdout lift, variant tests, frequency, programme lift, shop KPIs and trends (SQL
aggregates), as text or offline HTML.

``build_report(engine, ReportOptions(...))`` returns a :class:`Report`; :func:`membercare.reports.html.write_html`
renders it as one self-contained HTML file with charts. Definitions: ``docs/reports.md``.
"""

from membercare.reports.frequency import FrequencySection
from membercare.reports.funnel import FunnelRow
from membercare.reports.kpis import Kpis
from membercare.reports.lift import HoldoutRow, ProgrammeLift
from membercare.reports.options import ReportOptions
from membercare.reports.report import Report, build_report
from membercare.reports.trends import TrendPoint
from membercare.reports.variants import VariantRow, VariantSection, variant_settings_from_campaigns

__all__ = ["FrequencySection", "FunnelRow", "HoldoutRow", "Kpis", "ProgrammeLift", "Report", "ReportOptions",
           "TrendPoint", "VariantRow", "VariantSection", "build_report", "variant_settings_from_campaigns"]
