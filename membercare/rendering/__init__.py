"""Templates and rendering (Prefect-free).

Public API::

    from membercare.rendering import CampaignRenderer, check_campaign, ensure_campaign_ready

* :class:`CampaignRenderer`: per campaign run; ``build_context`` per batch, ``render`` per message.
* :func:`check_campaign` / :func:`check_all`: the pre-flight check (``membercare templates check``).
* :func:`ensure_campaign_ready`: raises :class:`TemplateCheckError` so a campaign refuses to start
  while its templates fail the check.
* :class:`RenderLimits`: what one rendered part may cost (``CampaignRenderer(..., limits=...)``); a
  breach is a ``RenderError`` with code ``limit``.

See ``docs/templates.md`` for the template layout, the helpers and the context variables.
"""

from membercare.rendering.check import Problem, TemplateCheckError, check_all, check_campaign, ensure_campaign_ready
from membercare.rendering.context import with_coupon, with_order
from membercare.rendering.engine import ContentLimitError, Part, RenderError, TemplateStore
from membercare.rendering.limits import RenderLimits
from membercare.rendering.renderer import CampaignRenderer, fcm_payload_size, reset_stores, store_for

__all__ = [
    "CampaignRenderer",
    "Problem",
    "TemplateCheckError",
    "check_all",
    "check_campaign",
    "ensure_campaign_ready",
    "with_coupon",
    "with_order",
    "ContentLimitError",
    "Part",
    "RenderError",
    "RenderLimits",
    "TemplateStore",
    "fcm_payload_size",
    "reset_stores",
    "store_for",
]
