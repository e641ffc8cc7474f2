"""Campaigns: what marketing launches, and one occurrence of it from definition to summary.

:mod:`.definition` reads and validates ``templates/<campaign>/campaign.yaml`` (its names are re-exported
here: every layer reads campaign definitions).
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
