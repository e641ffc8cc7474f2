"""Engagement: the normalised event type, its ledger and the effects of each event (see docs/engagement.md)."""

from membercare.engagement.events import BounceClass, EngagementEvent, EventKind, InboundCommand, Provider

__all__ = ["BounceClass", "EngagementEvent", "EventKind", "InboundCommand", "Provider"]
