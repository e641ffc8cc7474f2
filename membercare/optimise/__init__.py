"""Optimisation: holdouts and lift, variant bandits, best channel, best send time, frequency evidence.

Pure, Prefect-free building blocks (numpy/scipy) called by the delivery planner, the campaign reports
and the flows. See ``docs/optimisation.md`` for every method's formulas, assumptions and defaults.

* :mod:`.assignment`: deterministic holdout, global-control and variant assignment (SHA-256 buckets,
  with matching SQL expressions).
* :mod:`.lift`: treated-vs-holdout lift with confidence intervals (binary and continuous outcomes).
* :mod:`.bandit`: Thompson-sampling allocation of template variants, winner promotion.
* :mod:`.channel_choice`: empirical-Bayes best channel per member (routing strategy ``best_engagement``).
* :mod:`.send_time`: best local send hour per member, next delivery instant.
* :mod:`.frequency`: unsubscribe/complaint rates by weekly message count.
* :mod:`.hooks`: the planner hooks of a run (:class:`~membercare.delivery.planner.PlanHooks`): control,
  holdout and variant assignment, best channel, best send time.
* :mod:`.history`: engagement history aggregated in SQL for those hooks (channel engagement, send hours).
* :mod:`.variants`: the stored variant shares of each campaign occurrence (``variant_allocations``).
"""
