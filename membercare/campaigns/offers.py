"""Offer coupons: the coupon a campaign occurrence issues to each member it messages.

A campaign with an ``offer:`` issues each member of a planning batch a coupon before the batch is rendered
(the templates show it), scaled to the member's trailing-365-day spend (``Offer.for_spend``) or, with
``size_by: cltv``, to the member's expected residual lifetime value at the run's as_of (``Offer.for_cltv``; the
models are fitted once per run and process, :func:`membercare.lifetime_value.run_snapshot`, and every batch looks
its members up in that fit; a shop too small to fit gives everyone the first tier). Codes are
deterministic per (campaign, occurrence, member), so a rerun or a second worker issues the same coupon, which
the unique ``coupons.code`` turns into a no-op. Held-out members (campaign holdout, global control) get none.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.campaigns.definition import CltvTier, OfferStep
from membercare.campaigns.occurrence import PreparedRun
from membercare.db import insert_for
from membercare.errors import InputError
from membercare.lifetime_value import run_snapshot
from membercare.models import PURCHASE_STATUSES, Coupon, Order, Purpose
from membercare.optimise.hooks import in_control_or_holdout

log = logging.getLogger(__name__)


def coupon_code(campaign: str, occurrence: str, member_id: int) -> str:
    """The deterministic code of the offer coupon a campaign occurrence issues to a member.

    Deterministic so that a rerun (or a second worker) issues the same coupon, which the unique
    ``coupons.code`` turns into a no-op. 50 bits of SHA-256 in Crockford-free base32: unguessable enough for
    a code that is only valid for its member.
    """
    digest = hashlib.sha256(f"{campaign}|{occurrence}|{member_id}".encode()).digest()
    tail = base64.b32encode(digest[:10]).decode().rstrip("=")[:10]
    prefix = "".join(c for c in campaign.upper() if c.isalnum())[:16] or "MC"
    return f"{prefix}-{tail}"


def issue_offer_coupons(conn: Connection, prepared: PreparedRun, member_ids: Sequence[int]) -> int:
    """Issue the campaign's offer coupon to ``member_ids`` (idempotent); returns how many were new.

    The value step follows each member's trailing-365-day spend (``Offer.for_spend``), computed in one query.
    """
    offer = prepared.campaign.offer
    if offer is None or not member_ids:
        return 0
    o, c = Order.__table__, Coupon.__table__
    as_of = prepared.as_of
    steps: dict[int, OfferStep | CltvTier]
    if offer.size_by == "cltv":
        values = cltv_values(conn, prepared, member_ids)
        steps = {mid: offer.for_cltv(values.get(mid, 0.0)) for mid in member_ids}
    else:
        spend: dict[int, int] = dict(conn.execute(
            sa.select(o.c.member_id, sa.func.coalesce(sa.func.sum(o.c.total_minor), 0))
            .where(o.c.member_id.in_(list(member_ids)), o.c.status.in_(PURCHASE_STATUSES),
                   o.c.placed_at <= as_of, o.c.placed_at > as_of - timedelta(days=365))
            .group_by(o.c.member_id)).tuples().all())
        steps = {mid: offer.for_spend(int(spend.get(mid, 0))) for mid in member_ids}
    rows = []
    for mid in member_ids:
        step = steps[mid]
        rows.append(dict(
            code=coupon_code(prepared.name, prepared.occurrence, mid), member_id=mid, kind=offer.kind.value,
            amount_minor=step.amount_minor, percent_off=step.percent_off, currency=offer.currency,
            min_spend_minor=offer.min_spend_minor, issued_at=as_of,
            expires_at=as_of + timedelta(days=offer.valid_days), redeemed_at=None, redeemed_order_id=None,
            campaign=prepared.name))
    ins = insert_for(conn, c).on_conflict_do_nothing(index_elements=["code"]).returning(c.c.code)
    return len(conn.execute(ins, rows).scalars().all())


def cltv_values(conn: Connection, prepared: PreparedRun, member_ids: Sequence[int]) -> dict[int, float]:
    """Member -> expected residual lifetime value (minor units) at the run's as_of, for members with a purchase
    up to then; empty when the shop is too small to fit the models (everyone then gets the first tier)."""
    offer = prepared.campaign.offer
    if offer is None or not member_ids:
        return {}
    try:
        snap = run_snapshot(conn, f"{prepared.name}|{prepared.occurrence}", prepared.as_of,
                            months=offer.cltv_months, annual_discount=offer.cltv_discount)
    except InputError as exc:
        log.warning("campaign %s: offer sized by CLTV, but no value model (%s): first tier for everyone",
                    prepared.name, exc)
        return {}
    value, _, known = snap.lookup(list(member_ids))
    return {int(m): float(v) for m, v, k in zip(member_ids, value, known, strict=True) if k}


def held_out(prepared: PreparedRun, ids: Sequence[int]) -> list[int]:
    """Members who get no message (campaign holdout or programme-wide global control): no offer coupon."""
    control = prepared.settings.global_control_rate if prepared.campaign.purpose == Purpose.MARKETING else 0.0
    if (prepared.holdout_rate <= 0 and control <= 0) or not ids:
        return []
    return in_control_or_holdout(ids, prepared.name, holdout_rate=prepared.holdout_rate, control_rate=control,
                                 control_salt=prepared.settings.global_control_salt)


def issue_batch_coupons(conn: Connection, prepared: PreparedRun, member_ids: Sequence[int]) -> int:
    """Issue the offer coupon to the members of a planning batch who get a message (held-out members get none).

    Returns how many coupons were new; 0 for a campaign without an offer.
    """
    if prepared.campaign.offer is None:
        return 0
    held = set(held_out(prepared, member_ids))
    return issue_offer_coupons(conn, prepared, [m for m in member_ids if m not in held])


__all__ = ["coupon_code", "cltv_values", "held_out", "issue_batch_coupons", "issue_offer_coupons"]
