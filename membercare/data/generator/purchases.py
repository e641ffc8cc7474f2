"""What members buy: orders with their lines (BG/NBD purchase histories) and the coupons they hold and redeem."""

from __future__ import annotations

import numpy as np

from membercare.data.generator.arrays import (
    base32,
    choice,
    fmt_ts,
    local_day_start,
    permute,
    row_choice,
    seg_cumsum,
    seg_starts,
    time_of_day,
)
from membercare.data.generator.model import CURRENCY, DAY, SHOP_OFFSET, Context


def make_orders(ctx: Context, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray) -> dict:
    """BG/NBD purchase histories, statuses and basket lines."""
    m, n, as_of = ctx.model, len(member_id), ctx.as_of
    # First purchase: at signup (checkout registration) or some days later; some never buy.
    at_signup = rng.random(n) < m.signup_purchase_share
    delay = np.where(at_signup, rng.integers(120, 3 * 3600, n), (rng.exponential(25.0, n) * DAY).astype(np.int64))
    first = joined + delay
    buyer = (rng.random(n) >= m.never_buy_share) & (first < as_of - 60)

    lam = rng.gamma(m.r, 1.0 / m.alpha, n)               # purchases per day while alive
    p = rng.beta(m.a, m.b, n)                            # dropout probability after each purchase
    span = np.maximum(as_of - first, 0) / DAY            # days from the first purchase to now
    alive_repeats = rng.geometric(np.clip(p, 1e-6, 1)) - 1   # repeats before dropping out
    arrivals = rng.poisson(lam * span)                   # repeats the rate allows by now
    repeats = np.where(buyer, np.minimum(np.minimum(alive_repeats, arrivals), m.max_orders - 1), 0)

    # Repeat times: the first k of M uniform arrival times on [first, now], via exponential spacings
    # (the k smallest of M sorted uniforms are C_j / (C_k + Gamma(M + 1 - k)), C = cumulative Exp(1)).
    total_rep = int(repeats.sum())
    e = rng.exponential(1.0, total_rep)
    c = seg_cumsum(e, repeats)
    rep_owner = np.repeat(np.arange(n), repeats)
    c_last = np.bincount(rep_owner, weights=e, minlength=n)
    rest = rng.gamma(np.maximum(arrivals - repeats + 1, 1).astype(float))
    frac = c / (c_last + rest)[rep_owner]
    rep_t = first[rep_owner] + (frac * span[rep_owner] * DAY).astype(np.int64)
    # Repeat orders happen at the shop's busy hours, not uniformly round the clock.
    rep_t = local_day_start(rep_t) + time_of_day(rng, total_rep)

    owner = np.concatenate([np.flatnonzero(buyer), rep_owner])
    t = np.concatenate([first[buyer], rep_t])
    t = np.clip(t, joined[owner] + 60, as_of - 1)
    order = np.lexsort((t, owner))
    owner, t = owner[order], t[order]
    k = len(owner)

    # Status by age relative to now, with a few cancellations and refunds.
    age_d = (as_of - t) / DAY
    u = rng.random(k)
    status = np.full(k, "delivered", dtype=object)
    status[age_d < 5] = np.where(rng.random(int((age_d < 5).sum())) < 0.5, "shipped", "delivered")
    status[age_d < 2] = np.where(rng.random(int((age_d < 2).sum())) < 0.6, "shipped", "paid")
    status[age_d < 0.5] = np.where(rng.random(int((age_d < 0.5).sum())) < 0.3, "placed", "paid")
    cancelled = u < m.cancel_rate
    refunded = (~cancelled) & (u < m.cancel_rate + m.refund_rate) & (age_d > 7)
    status[cancelled] = "cancelled"
    status[refunded] = "refunded"
    delivered_at = np.full(k, -1, dtype=np.int64)
    dsel = (status == "delivered") | (status == "refunded")
    # Delivery 1-4 days after the order, and for recent orders some time before now.
    lag = np.minimum(rng.uniform(1.2, 4.0, k) * DAY, (as_of - t) * rng.uniform(0.5, 0.95, k)).astype(np.int64)
    delivered_at[dsel] = t[dsel] + lag[dsel]
    updated = t.copy()
    updated[dsel] = delivered_at[dsel]
    updated[status == "refunded"] = np.minimum(delivered_at + (rng.uniform(2, 10, k) * DAY).astype(np.int64),
                                               as_of - 1)[status == "refunded"]
    updated[cancelled] = np.minimum(t + rng.integers(300, DAY, k), as_of - 1)[cancelled]
    updated[status == "shipped"] = np.minimum(t + rng.integers(4 * 3600, 2 * DAY, k), as_of - 1)[status == "shipped"]
    updated[status == "paid"] = np.minimum(t + rng.integers(10, 600, k), as_of - 1)[status == "paid"]

    # Baskets: categories from the member's affinity, the complement of the first line, products by popularity.
    cat = ctx.catalogue
    affinity = rng.dirichlet(0.8 * cat.demand / cat.demand.mean(), n)
    n_lines = 1 + np.minimum(rng.poisson(0.75, k), 5)
    line_order = np.repeat(np.arange(k), n_lines)
    line_no = np.arange(len(line_order)) - np.repeat(seg_starts(n_lines), n_lines) + 1
    line_cat = row_choice(rng, affinity[owner[line_order]])
    first_cat = line_cat[seg_starts(n_lines)][line_order]
    comp = (line_no > 1) & (rng.random(len(line_order)) < 0.35)
    line_cat[comp] = cat.complement[first_cat[comp]]
    prod = cat.pick(rng, line_cat)
    qty = 1 + choice(rng, [75, 17, 5, 1.5, 1, 0.5], len(line_order))
    amount = cat.price[prod] * qty
    total = np.bincount(line_order, weights=amount, minlength=k).astype(np.int64)

    order_id = ctx.take_ids("orders", k)
    line_id = ctx.take_ids("order_lines", len(line_order))
    t_s, d_s, u_s = fmt_ts(t), fmt_ts(delivered_at), fmt_ts(updated)
    mids = member_id[owner].tolist()
    rows = list(zip(order_id.tolist(), [f"SO{i:010d}" for i in order_id.tolist()], mids, t_s, status.tolist(),
                    total.tolist(), [CURRENCY] * k, d_s, u_s, strict=True))
    lo = order_id[line_order].tolist()
    sku = [cat.sku[i] for i in prod.tolist()]
    catname = [cat.categories[c] for c in cat.category[prod].tolist()]
    line_rows = list(zip(line_id.tolist(), lo, line_no.tolist(), cat.product_id[prod].tolist(), sku, catname,
                         qty.tolist(), amount.tolist(), [CURRENCY] * len(line_order), strict=True))
    return dict(rows=rows, line_rows=line_rows, owner=owner, t=t, status=status, total=total, id=order_id)


def make_coupons(ctx: Context, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray,
                 orders: dict) -> list:
    """Welcome coupons, campaign coupons over the years, and a flash campaign expiring in 1-3 days."""
    m, n, as_of = ctx.model, len(member_id), ctx.as_of
    today_start = int(local_day_start(np.array([as_of]))[0])
    parts = []
    # Welcome: NT$100 off the first order, valid 30 days.
    w = np.flatnonzero(rng.random(n) < 0.92)
    parts.append(dict(owner=w, issued=joined[w] + 30, valid=np.full(len(w), 30 * DAY), kind=np.zeros(len(w), int),
                      value=np.full(len(w), 10_000), min_spend=np.zeros(len(w), np.int64), camp=np.zeros(len(w), int),
                      p_redeem=np.full(len(w), 0.55)))
    # Campaign coupons, about one a year per member, valid 14-30 days.
    tenure = (as_of - joined) / (365 * DAY)
    cnt = rng.poisson(1.0 * tenure)
    o = np.repeat(np.arange(n), cnt)
    k = len(o)
    issued = joined[o] + (rng.random(k) * (as_of - joined[o])).astype(np.int64)
    kind = (rng.random(k) < 0.4).astype(int)  # 1 = percent
    value = np.where(kind == 1, rng.choice([10, 15, 20], k), rng.choice([5_000, 10_000, 15_000, 20_000, 30_000], k))
    min_spend = np.where(kind == 1, 0, value * rng.choice([5, 8, 10], k))
    parts.append(dict(owner=o, issued=issued, valid=rng.choice([14, 21, 30], k) * DAY, kind=kind, value=value,
                      min_spend=min_spend, camp=np.ones(k, int), p_redeem=np.full(k, 0.35)))
    # Flash sale: issued 4-10 days ago, expires at the end of the shop day today, tomorrow or the day after.
    f = np.flatnonzero((rng.random(n) < m.flash_coupon_share) & (joined < as_of - 11 * DAY))
    kf = len(f)
    f_issued = today_start - rng.integers(4, 11, kf) * DAY + rng.integers(9 * 3600, 12 * 3600, kf)
    f_expires = today_start + rng.integers(1, 4, kf) * DAY - 1
    parts.append(dict(owner=f, issued=f_issued, valid=f_expires - f_issued, kind=np.ones(kf, int),
                      value=np.full(kf, 15), min_spend=np.zeros(kf, np.int64), camp=np.full(kf, 2),
                      p_redeem=np.full(kf, 0.3)))
    c = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    c["expires"] = c["issued"] + c["valid"]
    srt = np.lexsort((c["issued"], c["owner"]))
    c = {key: v[srt] for key, v in c.items()}
    kc = len(c["owner"])

    # Redemption: the member's first purchase placed while the coupon was valid and meeting the minimum.
    o_owner, o_t, o_status, o_total = orders["owner"], orders["t"], orders["status"], orders["total"]
    purchase = (o_status != "cancelled") & (o_status != "refunded") & (o_status != "placed")
    key = o_owner.astype(np.int64) * (1 << 40) + (o_t - ctx.as_of + (1 << 39))
    pos = np.searchsorted(key, c["owner"].astype(np.int64) * (1 << 40) + (c["issued"] - ctx.as_of + (1 << 39)))
    ok = pos < len(key)
    pos_c = np.minimum(pos, max(len(key) - 1, 0))
    if len(key):
        ok &= (o_owner[pos_c] == c["owner"]) & (o_t[pos_c] < c["expires"]) & (o_t[pos_c] < as_of)
        ok &= purchase[pos_c] & (o_total[pos_c] >= c["min_spend"])
    else:
        ok[:] = False
    ok &= rng.random(kc) < c["p_redeem"]
    # One coupon per order: the earliest issued keeps it.
    red = np.flatnonzero(ok)
    _, first_use = np.unique(pos_c[red], return_index=True)
    keep = np.zeros(kc, bool)
    keep[red[first_use]] = True
    redeemed_order = np.where(keep, orders["id"][pos_c] if len(key) else -1, -1)
    redeemed_at = np.where(keep, o_t[pos_c] if len(key) else -1, -1)

    ids = ctx.take_ids("coupons", kc)
    prefix = np.array(["WELCOME", "SALE", "FLASH"])[c["camp"]]
    codes = base32(permute(ids, 32**7, (ctx.seed * 104_729) % 32**7), 7)
    issued_local = (c["issued"] + SHOP_OFFSET).astype("datetime64[s]").astype(object)
    campaign = []
    for cp, d in zip(c["camp"].tolist(), issued_local, strict=True):
        if cp == 0:
            campaign.append("welcome")
        elif cp == 2:
            campaign.append(f"flash-{d:%Y%m%d}")
        elif d.month == 11:
            campaign.append(f"double-11-{d:%Y}")
        elif d.month in (6, 7):
            campaign.append(f"mid-year-sale-{d:%Y}")
        else:
            campaign.append(f"member-day-{d:%Y%m}")
    is_pct = c["kind"] == 1
    return list(zip(
        ids.tolist(), [f"{p}-{code}" for p, code in zip(prefix.tolist(), codes, strict=True)],
        member_id[c["owner"]].tolist(),
        np.where(is_pct, "percent", "amount").tolist(),
        [None if pc else int(v) for pc, v in zip(is_pct.tolist(), c["value"].tolist(), strict=True)],
        [int(v) if pc else None for pc, v in zip(is_pct.tolist(), c["value"].tolist(), strict=True)],
        [CURRENCY] * kc, c["min_spend"].astype(np.int64).tolist(), fmt_ts(c["issued"]), fmt_ts(c["expires"]),
        fmt_ts(redeemed_at), [None if x < 0 else x for x in redeemed_order.tolist()], campaign, strict=True,
    ))
