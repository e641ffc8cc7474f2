"""Campaigns: what marketing launches (the definition), and one occurrence of it from definition to summary.

One module per concept, from the bottom up (each imports only the ones before it; ``tests/test_layers.py``):

* :mod:`.definition`: ``templates/<campaign>/campaign.yaml``, loaded and validated. Its names are re-exported
  here; it is the only part of this package that lower layers (rendering, optimisation) may read.
* :mod:`.occurrence`: ``RunOptions``, the occurrence key and :func:`~.occurrence.prepare`, which gives the
  ``PreparedRun`` every stage takes.
* :mod:`.audience`: who the run is for, as keys only (segment, explicit members, delivered orders).
* :mod:`.offers`: the offer coupon each messaged member gets.
* :mod:`.plan`: planning a group of the audience into outbox rows (coupons, template contexts, the planner
  hooks, the outbox planner ``membercare.delivery.planner``), with the planning worker pool.
* :mod:`.dry_run`: what would go out, without writing anything; the template preview.
* :mod:`.summary`: the run's counts from the ledger.
* :mod:`.dispatch`: dispatcher passes over the run.
* :mod:`.triggers`: the campaigns an event starts for one member.
* :mod:`.run`: every stage in one process (``run_campaign``); the Prefect flow ``flows/campaign.py``
  sequences the same stages as tasks.

See ``docs/campaigns.md``.
"""

from membercare.campaigns.definition import (
    CAMPAIGN_FILE,
    NAME_PATTERN,
    RESERVED_VARIANT_NAMES,
    VARIANT_NAME_PATTERN,
    Campaign,
    CampaignDefinitionError,
    Offer,
    OfferStep,
    Optimise,
    PushRules,
    SegmentRef,
    SmsRules,
    Trigger,
    VariantTest,
    campaign_names,
    list_campaigns,
    load_campaign,
    parse_campaign,
)

__all__ = [
    "CAMPAIGN_FILE", "NAME_PATTERN", "RESERVED_VARIANT_NAMES", "VARIANT_NAME_PATTERN", "Campaign",
    "CampaignDefinitionError", "Offer", "OfferStep", "Optimise", "PushRules", "SegmentRef", "SmsRules", "Trigger",
    "VariantTest", "campaign_names", "list_campaigns", "load_campaign", "parse_campaign",
]
