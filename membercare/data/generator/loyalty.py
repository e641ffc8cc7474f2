"""The loyalty programme: each member's tier from their purchases, and the points ledger behind the balance."""

from __future__ import annotations

import numpy as np

from membercare.data.generator.arrays import fmt_ts, seg_cumsum, seg_starts
from membercare.data.generator.model import CURRENCY, DAY, Context
from membercare.models import PURCHASE_STATUSES


def _qualifies(tier: dict, spend: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A tier's upgrade bar: spend OR order count over the window (a zero bar is no bar, unless both are)."""
    s, o = int(tier["upgrade_spend_minor"]), int(tier["upgrade_orders"])
    if s <= 0 and o <= 0:
        return np.ones(len(spend), bool)
    q = np.zeros(len(spend), bool)
    if s > 0:
        q |= spend >= s
    if o > 0:
        q |= count >= o
    return q


def make_tiers(ctx: Context, member_id: np.ndarray, joined: np.ndarray,
               orders: dict) -> tuple[np.ndarray, list, np.ndarray]:
    """Current tier from trailing-window purchases, and one ``initial`` tier_history row per member.

    ``valid_from`` is the moment the member first met the bar within the current window (for the
    entry tier: joining), so "tier at time t" queries agree with the orders.
    """
    n, as_of = len(member_id), ctx.as_of
    owner, t, status, total = orders["owner"], orders["t"], orders["status"], orders["total"]
    purchase = np.isin(status, PURCHASE_STATUSES)
    tier_idx = np.zeros(n, dtype=np.int64)
    valid_from = joined.copy()
    spend12 = np.zeros(n, np.int64)
    count12 = np.zeros(n, np.int64)
    for rank, tier in enumerate(ctx.tiers):
        if rank == 0:
            continue
        win = purchase & (t > as_of - int(tier["window_days"]) * DAY)
        o, tt, amt = owner[win], t[win], total[win]
        counts = np.bincount(o, minlength=n)
        spend = np.bincount(o, weights=amt, minlength=n).astype(np.int64)
        if rank == 1:
            spend12, count12 = spend, counts
        q = _qualifies(tier, spend, counts)
        if not q.any():
            continue
        # Running totals within the window (orders are sorted by member, time) -> first qualifying order.
        cum_spend = seg_cumsum(amt, counts)
        cum_count = seg_cumsum(np.ones(len(o), np.int64), counts)
        hit = _qualifies(tier, cum_spend, cum_count)
        hit_pos = np.flatnonzero(hit)
        first_hit = np.full(n, -1)
        if len(hit_pos):
            mem, idx = np.unique(o[hit_pos], return_index=True)
            first_hit[mem] = tt[hit_pos[idx]]
        sel = q & (first_hit >= 0)
        tier_idx[sel] = rank
        valid_from[sel] = first_hit[sel]
    codes = np.array([tr["code"] for tr in ctx.tiers], dtype=object)[tier_idx]
    ids = ctx.take_ids("tier_history", n)
    vf = fmt_ts(valid_from)
    detail = [f"generated: trailing 12-month purchases {c} orders, {s // 100:,} {CURRENCY}"
              for c, s in zip(count12.tolist(), spend12.tolist(), strict=True)]
    rows = list(zip(ids.tolist(), member_id.tolist(), codes.tolist(), [None] * n, ["initial"] * n, vf, [None] * n, vf,
                    detail, strict=True))
    return codes, rows, valid_from


def make_points(ctx: Context, rng: np.random.Generator, member_id: np.ndarray, orders: dict, tier: np.ndarray,
            tier_from: np.ndarray) -> tuple[list, np.ndarray]:
    """Points ledger: earned per paid order at the tier's rate; redeemers spend, the others let points expire.

    The two behaviours are kept apart so that the balance never dips below zero at any point in time.
    """
    n, as_of = len(member_id), ctx.as_of
    rates = {tr["code"]: int(tr["points_per_100"]) for tr in ctx.tiers}
    entry_rate = int(ctx.tiers[0]["points_per_100"])
    member_rate = np.array([rates[c] for c in tier.tolist()], dtype=np.int64)
    owner, t, status, total, oid = orders["owner"], orders["t"], orders["status"], orders["total"], orders["id"]
    earns = np.isin(status, ["paid", "shipped", "delivered"])
    rate = np.where(t >= tier_from[owner], member_rate[owner], entry_rate)
    pts = (total // 10_000) * rate  # total is in hundredths: per NT$100 spent
    earns &= pts > 0
    e_owner, e_t, e_pts, e_oid = owner[earns], t[earns], pts[earns], oid[earns]
    e_exp = e_t + 365 * DAY
    redeemer = rng.random(n) < ctx.model.points_redeemer_share

    # Redeemers spend part of what they had at their latest earning order.
    e_counts = np.bincount(e_owner, minlength=n)
    last_pos = seg_starts(e_counts) + e_counts - 1
    before = seg_cumsum(e_pts, e_counts) - e_pts  # earned before each entry
    spenders = np.flatnonzero(redeemer & (e_counts >= 2))
    sp_pos = last_pos[spenders]
    sp_pts = (before[sp_pos] * rng.uniform(0.5, 1.0, len(spenders))).astype(np.int64) // 10 * 10
    keep = sp_pts > 0
    spenders, sp_pos, sp_pts = spenders[keep], sp_pos[keep], sp_pts[keep]
    # Everyone else lets points lapse after a year.
    exp_sel = ~redeemer[e_owner] & (e_exp <= as_of)

    # Assemble per member in time order: spend before the same order's earning.
    kinds = np.concatenate([np.zeros(len(e_owner), int), np.ones(len(spenders), int), np.full(int(exp_sel.sum()), 2)])
    own = np.concatenate([e_owner, spenders, e_owner[exp_sel]])
    when = np.concatenate([e_t, e_t[sp_pos], e_exp[exp_sel]])
    points = np.concatenate([e_pts, -sp_pts, -e_pts[exp_sel]])
    order_ref = np.concatenate([e_oid, e_oid[sp_pos], np.full(int(exp_sel.sum()), -1)])
    src_entry = np.concatenate([np.full(len(e_owner), -1), np.full(len(spenders), -1), np.flatnonzero(exp_sel)])
    # Per member in time order; at the same instant a checkout's spend comes before its earning.
    srt = np.lexsort((np.where(kinds == 1, -1, kinds), when, own))
    kinds, own, when, points, order_ref, src_entry = (a[srt] for a in (kinds, own, when, points, order_ref, src_entry))
    ids = ctx.take_ids("points_ledger", len(kinds))
    # Ledger id of every earned entry (the expiry rows name it in their dedupe key). The earned rows
    # were concatenated first, so their pre-sort position is their index in e_*.
    pos_of_earn = np.empty(len(e_owner), dtype=np.int64)
    inv = np.flatnonzero(kinds == 0)
    pos_of_earn[srt[inv]] = inv
    earned_id = ids[pos_of_earn]
    kind_names = np.array(["earned", "spent", "expired"], dtype=object)[kinds]
    dedupe: list[str] = []
    notes: list[str | None] = []
    expires = np.full(len(kinds), -1, dtype=np.int64)
    expires[kinds == 0] = when[kinds == 0] + 365 * DAY
    for kd, ref, se in zip(kinds.tolist(), order_ref.tolist(), src_entry.tolist(), strict=True):
        if kd == 0:
            dedupe.append(f"order:{ref}:earned")
            notes.append(None)
        elif kd == 1:
            dedupe.append(f"order:{ref}:spent")
            notes.append("redeemed at checkout")
        else:
            eid = int(earned_id[se])
            dedupe.append(f"points:{eid}:expired")
            notes.append(f"expiry of ledger entry {eid}")
    balance = np.bincount(own, weights=points, minlength=n).astype(np.int64)
    rows = list(zip(ids.tolist(), member_id[own].tolist(), kind_names.tolist(), points.tolist(), fmt_ts(when),
                    fmt_ts(expires), [None if r < 0 else r for r in order_ref.tolist()], dedupe, notes, strict=True))
    return rows, balance
