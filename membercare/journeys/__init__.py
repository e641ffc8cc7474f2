"""Journeys: multi-step member care with waits, branches, exits and events, exactly once per step.

* :mod:`.definition`: ``templates/<journey>/journey.yaml``, loaded and validated (file:line errors).
* :mod:`.models`: the instance, step-log and member-event tables.
* :mod:`.conditions`: what the advancer reads about a member (exits, branch conditions, events).
* :mod:`.waits`: when a wait step ends (duration, time of day in the member's zone, a date attribute).
* :mod:`.entry`: members entering a journey (re-entry policy, holdout at entry).
* :mod:`.events`: member events in (our shape and the Segment/RudderStack ``track`` shape), stored once.
* :mod:`.send`: a send step planned through the campaign planner and the outbox.
* :mod:`.advance`: the advancer: due instances in batches, each step executed exactly once.
* :mod:`.simulate`: the path a member would take, with reasons, sending nothing.
* :mod:`.funnel`: a journey's funnel and the conversion of messaged against held-out instances.

Journeys sit beside the campaign stages (they call the planner the way a campaign does) and below the entry
points (``membercare/cli``, ``membercare/receiver``, ``flows/journeys.py``). See ``docs/journeys.md``.
"""
