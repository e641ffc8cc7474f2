"""The funnel per campaign x segment x channel, over the outbox rows scheduled in ``[since, until)``.

Holdout rows are excluded (they are the holdout section). ``planned`` = ledger rows (every member the segment
selected and did not hold out, including those skipped with a reason), ``sent`` = state ``sent``;
``delivered``/``opened``/``clicked`` = messages with at least one such event, where a later stage implies the
earlier ones (a click proves an open that a privacy proxy may have hidden); push taps count as opens.
``converted`` = messages credited with at least one order by the attribution model, ``revenue`` = the credited
orders' totals; ``unsubscribed`` = messages followed by an unsubscribe or spam complaint: carrying the message
id, or, for opt-outs that carry none (SMS STOP replies, one-click unsubscribes), the member's latest message
sent on that channel within the attribution window before it. SMS segments are summed over sent SMS;
cost = segments x price.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import OutboxState
from membercare.engagement.attribution import within_window
from membercare.engagement.attribution_models import ConversionType, SmsMessageSegments
from membercare.engagement.events import EventKind, InboundCommand
from membercare.reports.options import ReportOptions
from membercare.reports.sql import CLICKED, CONTROLS, DELIVERED, OB, OPENED, OPTED_OUT, A, E, flag, scope, sum_if

NO_CHANNEL = "-"  # funnel rows of members who got no channel (skipped before routing chose one)
NO_CHANNEL_LABEL = "none"
NO_CHANNEL_NOTE = ("channel 'none': members the campaign planned but never sent on any channel: held out for lift "
                   "measurement, or skipped (no consent, frequency cap, unreachable) before routing chose one")


def channel_label(channel: str) -> str:
    """The channel as a reader sees it: the rows of members who got no channel say so."""
    return NO_CHANNEL_LABEL if channel == NO_CHANNEL else channel


@dataclass
class FunnelRow:
    campaign: str
    segment: str | None
    channel: str
    planned: int = 0
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    converted: int = 0  # messages credited with at least one order
    orders: int = 0
    revenue_minor: int = 0
    coupons: int = 0  # credited coupon redemptions
    unsubscribed: int = 0
    sms_segments: int = 0
    sms_cost_minor: int = 0

    def rate(self, numerator: str, denominator: str = "sent") -> float | None:
        d = getattr(self, denominator)
        return getattr(self, numerator) / d if d else None

    def add(self, other: FunnelRow) -> None:
        for name in ("planned", "sent", "delivered", "opened", "clicked", "converted", "orders", "revenue_minor",
                     "coupons", "unsubscribed", "sms_segments", "sms_cost_minor"):
            setattr(self, name, getattr(self, name) + getattr(other, name))



def orphan_optouts(conn: Connection, options: ReportOptions) -> sa.Subquery:
    """Message ids credited with an opt-out that carried no message id (STOP reply, one-click unsubscribe):
    the member's latest message sent on that channel within the attribution window before it."""
    seconds = options.attribution.window_seconds
    optout = sa.or_(E.c.kind == EventKind.UNSUBSCRIBED.value,
                    sa.and_(E.c.kind == EventKind.INBOUND.value, E.c.reason == InboundCommand.STOP.value))
    ranked = sa.select(
        OB.c.message_id,
        sa.func.row_number().over(partition_by=E.c.id, order_by=[OB.c.sent_at.desc(), OB.c.id.desc()]).label("rn"),
    ).select_from(E.join(OB, sa.and_(
        OB.c.member_id == E.c.member_id, OB.c.channel == E.c.channel, OB.c.state == OutboxState.SENT.value,
        OB.c.sent_at.is_not(None), within_window(conn, E.c.occurred_at, OB.c.sent_at, seconds),
    ))).where(
        E.c.message_id.is_(None), E.c.member_id.is_not(None), optout,
        E.c.occurred_at >= options.since, E.c.occurred_at < options.until + options.attribution.window,
        *scope(options),
    ).subquery("ranked_optouts")
    return sa.select(ranked.c.message_id).where(ranked.c.rn == 1).distinct().subquery("orphan_optouts")


def funnel_rows(conn: Connection, options: ReportOptions) -> list[FunnelRow]:
    model = options.attribution.model.value
    credit = sa.select(
        A.c.message_id,
        sum_if(A.c.conversion_type == ConversionType.ORDER.value).label("orders"),
        sum_if(A.c.conversion_type == ConversionType.ORDER.value, A.c.revenue_minor).label("revenue"),
        sum_if(A.c.conversion_type == ConversionType.COUPON.value).label("coupons"),
    ).where(A.c.model == model).group_by(A.c.message_id).subquery("credit")
    orphans = orphan_optouts(conn, options)
    seg = SmsMessageSegments.__table__
    channel = sa.func.coalesce(OB.c.channel, NO_CHANNEL)
    per_message = sa.select(
        OB.c.id, OB.c.campaign, channel.label("channel"), OB.c.state,
        flag(E.c.kind.in_(DELIVERED + OPENED + CLICKED)).label("delivered"),
        flag(E.c.kind.in_(OPENED + CLICKED)).label("opened"),
        flag(E.c.kind.in_(CLICKED)).label("clicked"),
        flag(E.c.kind.in_(OPTED_OUT)).label("opted_out"),
    ).select_from(OB.outerjoin(E, E.c.message_id == OB.c.message_id)).where(
        *scope(options), sa.or_(OB.c.variant.is_(None), OB.c.variant.not_in(CONTROLS)),
    ).group_by(OB.c.id, OB.c.campaign, channel, OB.c.state).subquery("per_message")
    pm_outbox = OB.alias("pm_outbox")
    sent = per_message.c.state == OutboxState.SENT.value
    query = sa.select(
        per_message.c.campaign, per_message.c.channel,
        sa.func.count().label("planned"),
        sum_if(sent).label("sent"),
        sa.func.coalesce(sa.func.sum(per_message.c.delivered), 0).label("delivered"),
        sa.func.coalesce(sa.func.sum(per_message.c.opened), 0).label("opened"),
        sa.func.coalesce(sa.func.sum(per_message.c.clicked), 0).label("clicked"),
        sum_if(credit.c.orders > 0).label("converted"),
        sa.func.coalesce(sa.func.sum(credit.c.orders), 0).label("orders"),
        sa.func.coalesce(sa.func.sum(credit.c.revenue), 0).label("revenue"),
        sa.func.coalesce(sa.func.sum(credit.c.coupons), 0).label("coupons"),
        sum_if(sa.or_(per_message.c.opted_out == 1, orphans.c.message_id.is_not(None))).label("unsubscribed"),
        sum_if(sa.and_(sent, per_message.c.channel == "sms"), sa.func.coalesce(seg.c.segments, 0)).label("segments"),
    ).select_from(
        per_message.join(pm_outbox, pm_outbox.c.id == per_message.c.id)
        .outerjoin(credit, credit.c.message_id == pm_outbox.c.message_id)
        .outerjoin(orphans, orphans.c.message_id == pm_outbox.c.message_id)
        .outerjoin(seg, seg.c.message_id == pm_outbox.c.message_id)
    ).group_by(per_message.c.campaign, per_message.c.channel).order_by(per_message.c.campaign, per_message.c.channel)
    out = []
    for r in conn.execute(query):
        out.append(FunnelRow(
            campaign=r.campaign, segment=options.segments.get(r.campaign), channel=r.channel, planned=int(r.planned),
            sent=int(r.sent), delivered=int(r.delivered), opened=int(r.opened), clicked=int(r.clicked),
            converted=int(r.converted), orders=int(r.orders), revenue_minor=int(r.revenue), coupons=int(r.coupons),
            unsubscribed=int(r.unsubscribed), sms_segments=int(r.segments),
            sms_cost_minor=int(r.segments) * options.sms_price_minor,
        ))
    return out

