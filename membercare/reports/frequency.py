"""Frequency evidence: member-weeks by marketing messages received, with the weeks' unsubscribe and complaint
rates (Wilson intervals) and the highest weekly count the evidence allows (:mod:`membercare.optimise.frequency`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import OutboxState
from membercare.engagement.events import EventKind, InboundCommand
from membercare.optimise.frequency import FrequencyBucket, frequency_table_from_counts, highest_safe_frequency
from membercare.reports.options import ReportOptions
from membercare.reports.sql import OB, E, bucket_expr, flag


@dataclass
class FrequencySection:
    """Weekly unsubscribe and complaint rates against marketing messages received per member that week."""

    buckets: list[FrequencyBucket]
    max_unsubscribe_rate: float
    max_complaint_rate: float | None
    min_member_weeks: int
    highest_safe: int | None  # the highest weekly message count whose evidence stays under the ceilings
    member_weeks: int
    messages: int

    def why_none_safe(self) -> str:
        """Why no weekly frequency is shown as safe (``highest_safe`` is None), in the reader's terms: too few
        member-weeks, or which *upper bound* (not the observed rate) crosses which ceiling."""
        first = next((b for b in self.buckets if b.member_weeks), None)
        if first is None:
            return "no member-weeks yet"
        at = f"at {first.label} message{'s' if first.label != '1' else ''} a week"
        if first.member_weeks < self.min_member_weeks:
            return (f"too little evidence: {first.member_weeks:,} member-weeks {at}, "
                    f"{self.min_member_weeks:,} needed")
        if first.unsubscribe_rate_ci[1] > self.max_unsubscribe_rate:
            return (f"not shown yet: {at} unsubscribes are {100 * first.unsubscribe_rate:.2f} %, but the upper 95 % "
                    f"bound, {100 * first.unsubscribe_rate_ci[1]:.2f} %, is above the "
                    f"{100 * self.max_unsubscribe_rate:.2f} % ceiling (more member-weeks narrow it)")
        ceiling = self.max_complaint_rate if self.max_complaint_rate is not None else 0.0
        return (f"not shown yet: {at} complaints are {100 * first.complaint_rate:.3f} %, but the upper 95 % bound, "
                f"{100 * first.complaint_rate_ci[1]:.3f} %, is above the {100 * ceiling:.3f} % ceiling")



def frequency_section(conn: Connection, options: ReportOptions) -> FrequencySection:
    """Member-weeks (ISO weeks in the shop's timezone) with at least one marketing message sent, grouped by the
    number of messages, with the member-weeks that had an unsubscribe (or STOP) and a spam complaint.

    All campaigns count (the frequency cap is cross-campaign), whatever ``options.campaign``.
    """
    weekly = replace(options, granularity="week")
    week_o = bucket_expr(conn, OB.c.sent_at, weekly)
    mw = sa.select(OB.c.member_id, week_o.label("week"), sa.func.count().label("messages")).where(
        OB.c.state == OutboxState.SENT.value, OB.c.purpose == "marketing",
        OB.c.sent_at >= options.since, OB.c.sent_at < options.until,
    ).group_by(OB.c.member_id, week_o).subquery("member_weeks")
    week_e = bucket_expr(conn, E.c.occurred_at, weekly)
    unsub = sa.or_(E.c.kind == EventKind.UNSUBSCRIBED.value,
                   sa.and_(E.c.kind == EventKind.INBOUND.value, E.c.reason == InboundCommand.STOP.value))
    complaint = E.c.kind == EventKind.COMPLAINED.value
    opt = sa.select(E.c.member_id, week_e.label("week"), flag(unsub).label("unsub"),
                    flag(complaint).label("complaint")).where(
        E.c.member_id.is_not(None), sa.or_(unsub, complaint),
        E.c.occurred_at >= options.since, E.c.occurred_at < options.until,
    ).group_by(E.c.member_id, week_e).subquery("optouts")
    query = sa.select(
        mw.c.messages, sa.func.count().label("member_weeks"),
        sa.func.coalesce(sa.func.sum(opt.c.unsub), 0).label("unsubscribes"),
        sa.func.coalesce(sa.func.sum(opt.c.complaint), 0).label("complaints"),
    ).select_from(mw.outerjoin(opt, sa.and_(opt.c.member_id == mw.c.member_id, opt.c.week == mw.c.week))
                  ).group_by(mw.c.messages)
    counts = [(int(m), int(n), int(u), int(c)) for m, n, u, c in conn.execute(query)]
    buckets = frequency_table_from_counts(counts, edges=options.frequency_edges, confidence=options.confidence)
    safe = highest_safe_frequency(buckets, max_unsubscribe_rate=options.max_unsubscribe_rate,
                                  max_complaint_rate=options.max_complaint_rate,
                                  min_member_weeks=options.min_member_weeks)
    return FrequencySection(buckets=buckets, max_unsubscribe_rate=options.max_unsubscribe_rate,
                            max_complaint_rate=options.max_complaint_rate, min_member_weeks=options.min_member_weeks,
                            highest_safe=safe, member_weeks=sum(b.member_weeks for b in buckets),
                            messages=sum(b.messages for b in buckets))

