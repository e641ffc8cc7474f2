"""How members can be reached: their app installs (push devices) and their consent history per channel."""

from __future__ import annotations

import numpy as np

from membercare.data.generator.arrays import base32, choice, fmt_ts, permute
from membercare.data.generator.model import DAY, Context


def make_devices(ctx: Context, rng: np.random.Generator, member_id: np.ndarray, joined: np.ndarray,
             age_idx: np.ndarray) -> list:
    """App installs: younger members more often; some stale, some invalidated by the push provider."""
    n, as_of = len(member_id), ctx.as_of
    p_app = np.array([0.72, 0.66, 0.55, 0.42, 0.32, 0.22, 0.45])[age_idx]  # index -1 = unknown age
    cnt = np.where(rng.random(n) < p_app, 1 + (rng.random(n) < 0.18), 0)
    o = np.repeat(np.arange(n), cnt)
    k = len(o)
    created = joined[o] + (rng.random(k) * 0.5 * (as_of - joined[o])).astype(np.int64)
    state = choice(rng, [65, 22, 13], k)  # active, stale, invalidated
    recent = as_of - (rng.exponential(3.0, k) * DAY).astype(np.int64)
    stale = as_of - rng.integers(90, 400, k) * DAY
    last_seen = np.where(state == 0, recent, stale)
    last_seen = np.clip(last_seen, created, as_of - 1)
    inval = np.where(state == 2, np.minimum(last_seen + rng.integers(1, 60, k) * DAY, as_of - 1), -1)
    reasons = np.array(["unregistered", "invalid_argument", "sender_id_mismatch"], dtype=object)
    reason = reasons[choice(rng, [85, 10, 5], k)]
    android = rng.random(k) < 0.58
    ids = ctx.take_ids("devices", k)
    # FCM-shaped registration tokens: an instance-id part, ':APA91b', then random URL-safe base64.
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)
    body = alphabet[rng.integers(0, 64, (k, 134))].tobytes().decode()
    inst = base32(permute(ids, 32**11, (ctx.seed * 15_485_863) % 32**11), 11)
    tokens = [f"{inst[i]}:APA91b{body[i * 134:(i + 1) * 134]}" for i in range(k)]
    return list(zip(
        ids.tolist(), member_id[o].tolist(), tokens, np.where(android, "android", "ios").tolist(),
        np.where(android, "tw.example.shop", "com.example.shop.ios").tolist(), fmt_ts(created), fmt_ts(last_seen),
        fmt_ts(inval), [r if s == 2 else None for r, s in zip(reason.tolist(), state.tolist(), strict=True)],
        strict=True,
    ))


_CHANNELS = ("email", "sms", "push")
_REVOKE_SOURCES = {
    "email": (("unsubscribe_link", 70), ("list_unsubscribe", 25), ("complaint", 5)),
    "sms": (("sms_stop", 90), ("preference_center", 10)),
    "push": (("preference_center", 100),),
}


def make_consents(ctx: Context, rng: np.random.Generator, member_id: np.ndarray,
                  joined: np.ndarray) -> tuple[list, list]:
    """Consent history (1-2 statements per channel x purpose) and the current state folded from it.

    Transactional messages are always granted at signup; marketing is opted into per channel at
    signup, and some members change their mind later (a second statement).
    """
    m, n, as_of = ctx.model, len(member_id), ctx.as_of
    joined_s = fmt_ts(joined)
    # Per member and channel: initial marketing choice, whether it changes, and when.
    init = {c: rng.random(n) < m.marketing_optin[c] for c in _CHANNELS}
    change = {}
    when = {}
    src = {}
    for c in _CHANNELS:
        u = rng.random(n)
        change[c] = np.where(init[c], u < m.marketing_revoke[c], u < m.marketing_late_optin) & (joined < as_of - 3600)
        when[c] = joined + 60 + (rng.random(n) * np.maximum(as_of - joined - 120, 1)).astype(np.int64)
        names = [s for s, _ in _REVOKE_SOURCES[c]]
        src[c] = np.array(names, dtype=object)[choice(rng, [w for _, w in _REVOKE_SOURCES[c]], n)]
    when_s = {c: fmt_ts(when[c]) for c in _CHANNELS}

    events, current = [], []
    for i in range(n):
        mid = int(member_id[i])
        for c in _CHANNELS:
            # The history: (purpose, granted, source, occurred) in time order per key.
            events.append((mid, c, "transactional", True, "signup_form", joined_s[i], joined_s[i], None))
            current.append((mid, c, "transactional", True, "signup_form", joined_s[i]))
            g0 = bool(init[c][i])
            events.append((mid, c, "marketing", g0, "signup_form", joined_s[i], joined_s[i], None))
            if change[c][i]:
                s = src[c][i] if g0 else "preference_center"
                events.append((mid, c, "marketing", not g0, s, when_s[c][i], when_s[c][i], None))
                current.append((mid, c, "marketing", not g0, s, when_s[c][i]))
            else:
                current.append((mid, c, "marketing", g0, "signup_form", joined_s[i]))
    ev_ids = ctx.take_ids("consent_events", len(events)).tolist()
    cur_ids = ctx.take_ids("consents", len(current)).tolist()
    return ([(i, *r) for i, r in zip(cur_ids, current, strict=True)],
            [(i, *r) for i, r in zip(ev_ids, events, strict=True)])
