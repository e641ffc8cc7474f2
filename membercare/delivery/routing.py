"""Routing: which channels, in which order, may carry a message to a member, and why.

For each candidate channel, in the member's preference order (``members.preferred_channels``;
a channel the member did not list is never used), the checks are, in order:

1. the campaign allows the channel;
2. the member consented to the channel *for the message's purpose* (marketing or transactional;
   a missing consent row is no consent; transactional messages bypass marketing caps but never consent);
3. the member is reachable on it: a syntactically valid email, an E.164 mobile number, a live push
   token (``devices.invalidated_at IS NULL`` and seen within ``push_token_max_age_days``), or a LINE
   user id (``U`` + 32 hex digits; a member who blocked the account is suppressed, step 4);
4. the address is not suppressed (hard bounce, complaint, unsubscribe, invalid; by address hash, or
   for the member on that channel or on every channel).

The channels that pass form the ordered **fallback chain**: the first is tried, the next ones are used
when a send fails permanently with ``fallback=True`` (an unregistered push token falls back to email).
Every rejected channel is kept with its reason, so a skipped member's ledger row says exactly why.

The functions here are pure; :func:`load_contexts` gathers what they need for a whole batch of
members in five queries (never one per member).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.delivery.models import Decision, OutboxState, Suppression, address_hash
from membercare.delivery.sqlutil import any_of, chunk_size
from membercare.models import LINE_USER_ID_PATTERN, Channel, Consent, Device, Member

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
LINE_USER_ID = re.compile(LINE_USER_ID_PATTERN)

CHANNELS: tuple[str, ...] = tuple(c.value for c in Channel)


@dataclass(frozen=True)
class MemberContext:
    """What routing needs to know about one member (addresses stay in memory, never in the ledger)."""

    member_id: int
    preferred: tuple[str, ...]
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None  # the newest live, unsuppressed token
    line_user_id: str | None = None
    timezone: str | None = None
    consents: Mapping[tuple[str, str], bool] = field(default_factory=dict)  # (channel, purpose) -> granted
    suppressed: Mapping[str, str] = field(default_factory=dict)  # channel -> reason
    row: Mapping | None = None  # the full members row, for renderers and assignment hooks

    def address(self, channel: str) -> str | None:
        addresses: dict[str, str | None] = {Channel.EMAIL: self.email, Channel.SMS: self.phone,
                                            Channel.PUSH: self.push_token, Channel.LINE: self.line_user_id}
        return addresses.get(channel)


@dataclass(frozen=True)
class Rejection:
    channel: str
    code: Decision
    detail: str


@dataclass(frozen=True)
class Route:
    chain: tuple[str, ...]
    code: Decision
    reason: str
    rejected: tuple[Rejection, ...] = ()

    @property
    def state(self) -> OutboxState:
        if self.chain:
            return OutboxState.PLANNED
        return OutboxState.SUPPRESSED if self.code == Decision.SUPPRESSED else OutboxState.SKIPPED


def candidate_order(preferred: Sequence[str], allowed: Iterable[str]) -> tuple[list[str], list[Rejection]]:
    """The member's preference order restricted to the channels the campaign allows."""
    allowed = set(allowed)
    order, rejected = [], []
    for ch in dict.fromkeys(preferred):
        if ch not in CHANNELS:
            continue
        if ch in allowed:
            order.append(ch)
        else:
            rejected.append(Rejection(ch, Decision.NO_ALLOWED_CHANNEL, "not used by this campaign"))
    return order, rejected


def check_channel(ctx: MemberContext, channel: str, purpose: str) -> Rejection | None:
    """Why ``channel`` cannot carry a ``purpose`` message to this member now, or ``None`` if it can."""
    if not ctx.consents.get((channel, purpose), False):
        return Rejection(channel, Decision.NO_CONSENT, f"no {purpose} consent")
    addr = ctx.address(channel)
    if channel == Channel.EMAIL and not (addr and _EMAIL.match(addr)):
        return Rejection(channel, Decision.NO_REACHABLE_CHANNEL, "no valid email address")
    if channel == Channel.SMS and not (addr and _E164.match(addr)):
        return Rejection(channel, Decision.NO_REACHABLE_CHANNEL, "no valid mobile number")
    if channel == Channel.PUSH and not addr:
        return Rejection(channel, Decision.NO_REACHABLE_CHANNEL, "no live push token")
    if channel == Channel.LINE and not (addr and LINE_USER_ID.match(addr)):
        return Rejection(channel, Decision.NO_REACHABLE_CHANNEL, "no LINE user id")
    why = ctx.suppressed.get(channel) or ctx.suppressed.get("any")
    if why:
        return Rejection(channel, Decision.SUPPRESSED, f"suppressed ({why})")
    return None


def route(ctx: MemberContext, candidates: Sequence[str], purpose: str,
          pre_rejected: Sequence[Rejection] = ()) -> Route:
    """Check ``candidates`` in order and return the fallback chain with the reason for every decision."""
    rejected = list(pre_rejected)
    chain = []
    for ch in candidates:
        why = check_channel(ctx, ch, purpose)
        if why is None:
            chain.append(ch)
        else:
            rejected.append(why)
    notes = "; ".join(f"{r.channel}: {r.detail}" for r in rejected)
    if chain:
        rank = ctx.preferred.index(chain[0]) + 1 if chain[0] in ctx.preferred else 0
        reason = f"via {chain[0]} (preference #{rank}, {purpose} consent, reachable)"
        if len(chain) > 1:
            reason += f"; fallback {','.join(chain[1:])}"
        if notes:
            reason += f"; not {notes}"
        return Route(tuple(chain), Decision.ROUTED, reason, tuple(rejected))
    if not rejected:
        return Route((), Decision.NO_ALLOWED_CHANNEL, "member prefers no channel this campaign uses")
    return Route((), _summary_code(rejected), f"no channel: {notes}", tuple(rejected))


def _summary_code(rejected: Sequence[Rejection]) -> Decision:
    """One code for a skipped member: the furthest any channel got through the checks."""
    codes = {r.code for r in rejected}
    if codes <= {Decision.NO_ALLOWED_CHANNEL}:
        return Decision.NO_ALLOWED_CHANNEL
    if codes <= {Decision.NO_ALLOWED_CHANNEL, Decision.NO_CONSENT}:
        return Decision.NO_CONSENT
    # Some channel had consent. If every consented channel was blocked only by the suppression list,
    # the member is "suppressed"; otherwise they are unreachable.
    if Decision.SUPPRESSED in codes and Decision.NO_REACHABLE_CHANNEL not in codes:
        return Decision.SUPPRESSED
    return Decision.NO_REACHABLE_CHANNEL


# ---------------------------------------------------------------------------------------------------------------------
# Set-based loading


def _chunks(seq: Sequence, n: int = 900) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def load_contexts(conn: Connection, member_ids: Sequence[int], purpose: str, now: datetime,
                  push_token_max_age: timedelta, *, full_rows: bool = True) -> dict[int, MemberContext]:
    """Routing contexts for a batch of members: five queries per chunk (900 members on SQLite; on
    PostgreSQL the ids travel as one array parameter, see :mod:`membercare.delivery.sqlutil`).

    ``full_rows=False`` (the dispatcher) reads only the member columns routing needs and leaves
    ``MemberContext.row`` empty: the whole members row is for planning (renderers, assignment hooks)."""
    out: dict[int, MemberContext] = {}
    for chunk in _chunks(list(dict.fromkeys(member_ids)), chunk_size(conn)):
        out.update(_load_chunk(conn, chunk, purpose, now, push_token_max_age, full_rows))
    return out


def _load_members(conn: Connection, ids: Sequence[int], full_rows: bool
                  ) -> tuple[list[tuple], dict[int, Mapping]]:
    """(id, preferred_channels, email, phone, line_user_id, timezone) of each member, and with ``full_rows``
    the whole rows by id."""
    m = Member.__table__
    if not full_rows:
        cols = (m.c.id, m.c.preferred_channels, m.c.email, m.c.phone, m.c.line_user_id, m.c.timezone)
        return [tuple(r) for r in conn.execute(sa.select(*cols).where(any_of(conn, m.c.id, ids))).all()], {}
    rows = conn.execute(sa.select(m).where(any_of(conn, m.c.id, ids))).mappings().all()
    full: dict[int, Mapping] = {r["id"]: r for r in rows}
    return [(mid, r["preferred_channels"], r["email"], r["phone"], r.get("line_user_id"), r["timezone"])
            for mid, r in full.items()], full


def _live_tokens(tokens: list[str] | None, suppressed: set[str]) -> list[str]:
    if not tokens:
        return []
    if not suppressed:  # the usual case: no hashing needed
        return tokens
    return [t for t in tokens if address_hash(Channel.PUSH.value, t) not in suppressed]


def _load_chunk(conn: Connection, ids: Sequence[int], purpose: str, now: datetime, max_age: timedelta,
                full_rows: bool) -> dict[int, MemberContext]:
    c, d, s = Consent.__table__, Device.__table__, Suppression.__table__
    # Every result is fetched whole (fetchall): iterating a result fetches row by row, which costs more.
    members, full = _load_members(conn, ids, full_rows)
    consents: dict[int, dict] = defaultdict(dict)
    for mid, ch, pur, granted in conn.execute(sa.select(c.c.member_id, c.c.channel, c.c.purpose, c.c.granted)
                                              .where(any_of(conn, c.c.member_id, ids), c.c.purpose == purpose)).all():
        consents[mid][(ch, pur)] = bool(granted)
    tokens: dict[int, list[str]] = defaultdict(list)
    for mid, token in conn.execute(sa.select(d.c.member_id, d.c.token)
                                   .where(any_of(conn, d.c.member_id, ids), d.c.invalidated_at.is_(None),
                                          d.c.last_seen_at >= now - max_age)
                                   .order_by(d.c.member_id, d.c.last_seen_at.desc(), d.c.id.desc())).all():
        tokens[mid].append(token)

    # Suppression lookups by address hash (the list holds no plaintext) and by member.
    hashes: dict[str, tuple[int, str]] = {}
    for mid, _pref, email, phone, line_id, _tz in members:
        for ch, addr in ((Channel.EMAIL.value, email), (Channel.SMS.value, phone), (Channel.LINE.value, line_id)):
            if addr:
                hashes[address_hash(ch, addr)] = (mid, ch)
        for tok in tokens.get(mid, ()):
            hashes[address_hash(Channel.PUSH.value, tok)] = (mid, Channel.PUSH.value)
    suppressed: dict[int, dict[str, str]] = defaultdict(dict)
    suppressed_tokens: set[str] = set()
    for part in _chunks(list(hashes), chunk_size(conn)):
        for h, s_channel, s_reason in conn.execute(sa.select(s.c.address_hash, s.c.channel, s.c.reason)
                                                   .where(any_of(conn, s.c.address_hash, part))).all():
            mid, ch = hashes[h]
            if s_channel not in (ch, "any"):
                continue
            if ch == Channel.PUSH:
                suppressed_tokens.add(h)  # another live token may still be usable
            else:
                suppressed[mid].setdefault(ch, s_reason)
    for mid, s_channel, s_reason in conn.execute(sa.select(s.c.member_id, s.c.channel, s.c.reason)
                                                 .where(any_of(conn, s.c.member_id, ids))).all():
        suppressed[mid].setdefault(s_channel, s_reason)

    out = {}
    for mid, pref, email, phone, line_id, tz in members:
        toks = tokens.get(mid)
        live = _live_tokens(toks, suppressed_tokens)
        sup = suppressed.get(mid, {})
        if toks and not live:
            sup = {**sup, Channel.PUSH.value: "token suppressed"}
        out[mid] = MemberContext(
            member_id=mid,
            preferred=tuple(x for x in (pref or "").split(",") if x),
            email=email, phone=phone, line_user_id=line_id,
            push_token=live[0] if live else (toks[0] if toks else None),
            timezone=tz, consents=consents.get(mid, {}), suppressed=sup, row=full.get(mid),
        )
    return out
