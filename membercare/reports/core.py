"""Former home of the report sections, now one module each (see :mod:`membercare.reports.report`).

Kept only for ``membercare.cli.report``, which imports ``variant_settings_from_campaigns`` from here and is
owned elsewhere; delete this module once it imports from :mod:`membercare.reports` instead.
"""

from membercare.reports.variants import variant_settings_from_campaigns

__all__ = ["variant_settings_from_campaigns"]
