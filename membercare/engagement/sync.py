"""Engagement sync: settle the ledger rows whose outcome only the providers' answers tell, then refresh run counts.

The reconcile step of delivery that needs engagement events: a provider event (delivered, opened,
bounced...) carries our message id, so it proves that a message the ledger still has as ``unknown``,
``sending`` or ``deferred`` was accepted. :func:`sync_engagement` (the ``sync-engagement`` flow, every 15
minutes) applies those proofs, then hands what is left to :mod:`membercare.delivery.reconcile` (provider
records, policy after a grace period). It lives here, not in ``membercare.delivery``, because it reads the
engagement ledger: engagement builds on delivery (``engagement.store`` already settles rows through
``delivery.reconcile``), and delivery stays below engagement (``tests/test_layers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.delivery.models import CampaignRun, OutboxMessage, OutboxState
from membercare.delivery.planner import refresh_run_counts
from membercare.delivery.reconcile import (
    ProviderRecords,
    ProviderVerdicts,
    mark_sent_from_event,
    reconcile_unknown,
    recover_stale,
)
from membercare.engagement.models import EngagementEventRow
from membercare.timeutil import ensure_utc, utcnow


@dataclass
class SyncReport:
    """How many ledger rows each step of :func:`sync_engagement` settled (counts only)."""

    recovered_stale: int = 0
    settled_from_events: int = 0
    reconciled_from_records: int = 0
    left_unknown: int = 0
    requeued: int = 0
    never_received: int = 0  # the provider confirmed it never got them: sent again
    pending: int = 0  # a source is still settling them (LINE: repeated with the same retry key next time)
    for_operator: int = 0  # never settled and never resent (LINE past its retry key's 24 hours)
    runs_refreshed: int = 0


def sync_engagement(engine: Engine, *, records: ProviderRecords | ProviderVerdicts | None = None,
                    lease: timedelta = timedelta(minutes=5),
                    grace: timedelta = timedelta(hours=1), lookback: timedelta = timedelta(days=3),
                    now: datetime | None = None) -> SyncReport:
    """Settle messages whose outcome the ledger does not know yet, then refresh the runs' counts.

    1. ``sending`` rows of dead dispatchers become ``unknown`` (:func:`recover_stale`);
    2. unknown, sending and deferred rows that a provider event names (delivered, opened, bounced... carry
       our message id) were accepted: they become ``sent`` (:func:`mark_sent_from_event`), which also
       cancels the retry of a deferred row whose first attempt really went through;
    3. the rest is looked up in ``records`` (a ``ProviderRecords``, e.g. the sandbox, or a ``ProviderVerdicts``
       such as :func:`membercare.delivery.provider_records.provider_records_from_env`, which can also confirm
       that a provider never received a message: those are sent again) and past ``grace`` settled by policy
       (:func:`reconcile_unknown`);
    4. runs updated within ``lookback`` get their state counts refreshed.
    """
    now = ensure_utc(now or utcnow())
    rep = SyncReport()
    rep.recovered_stale = recover_stale(engine, lease=lease, now=now).total
    o, e, r = OutboxMessage.__table__, EngagementEventRow.__table__, CampaignRun.__table__
    open_states = (OutboxState.UNKNOWN.value, OutboxState.SENDING.value, OutboxState.DEFERRED.value)
    last = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(o.c.id, o.c.message_id, sa.func.max(e.c.provider_message_id), sa.func.min(e.c.occurred_at))
                .join(e, e.c.message_id == o.c.message_id)
                .where(o.c.state.in_(open_states), o.c.attempts > 0, o.c.id > last)
                .group_by(o.c.id, o.c.message_id).order_by(o.c.id).limit(1000)).all()
        if not rows:
            break
        last = rows[-1][0]
        with engine.begin() as conn:
            for _id, mid, pmid, at in rows:
                rep.settled_from_events += bool(mark_sent_from_event(conn, mid, provider_message_id=pmid, at=at,
                                                                     source="engagement event"))
    rec = reconcile_unknown(engine, records=records, grace=grace, now=now)
    rep.reconciled_from_records, rep.left_unknown, rep.requeued = rec.found_sent, rec.left_unknown, rec.requeued
    rep.never_received, rep.pending, rep.for_operator = rec.never_received, rec.pending, rec.for_operator
    with engine.begin() as conn:
        ids = conn.execute(sa.select(r.c.id).where(r.c.updated_at >= now - lookback)).scalars().all()
        for run_id in ids:
            refresh_run_counts(conn, run_id)
        rep.runs_refreshed = len(ids)
    return rep


__all__ = ["SyncReport", "sync_engagement"]
