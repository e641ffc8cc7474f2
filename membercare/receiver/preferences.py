"""What the unsubscribe link and the preference centre change, as database operations.

Consent changes go through :func:`membercare.consent.record_consents` (the one writer of consent) with
the source that says how the member told us: ``list_unsubscribe`` (RFC 8058 one-click from the mail
client), ``unsubscribe_link`` (the button on the page), ``preference_center`` (the form). Marketing
changes are also recorded as ``unsubscribed`` / ``resubscribed`` engagement events so that campaign
reports count them next to provider-reported unsubscribes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.engagement.events import EngagementEvent, EventKind, Provider, stable_key
from membercare.engagement.store import ingest
from membercare.models import Channel, ConsentSource, Member, Purpose
from membercare.receiver.pages import CHANNELS, LOCKED, PURPOSES


@dataclass(frozen=True)
class MemberView:
    id: int
    name: str
    email: str | None
    phone: str | None
    locale: str
    consents: Mapping[tuple[str, str], bool]
    line_linked: bool = False


def load_member(conn: Connection, member_id: int) -> MemberView | None:
    m = Member.__table__
    row = conn.execute(sa.select(m.c.id, m.c.name, m.c.email, m.c.phone, m.c.locale, m.c.line_user_id)
                       .where(m.c.id == member_id)).first()
    if row is None:
        return None
    return MemberView(id=row.id, name=row.name, email=row.email, phone=row.phone, locale=row.locale,
                      consents=current_consents(conn, member_id), line_linked=row.line_user_id is not None)


def set_consents(conn: Connection, member: MemberView, desired: Mapping[tuple[str, str], bool], *,
                 source: ConsentSource, occurred_at: datetime, explicit_revoke: bool = False) -> int:
    """Record the statements that change ``member``'s consent to ``desired``; returns how many.

    A missing consent row counts as "not granted", so the form records nothing for it; with
    ``explicit_revoke`` (the unsubscribe actions) a revoke is recorded anyway, so the history shows the
    member's explicit refusal even if they never consented.
    """
    statements: list[ConsentStatement] = []
    events: list[EngagementEvent] = []
    for (channel, purpose), granted in sorted(desired.items()):
        if (channel, purpose) in LOCKED:
            continue
        current = member.consents.get((channel, purpose))
        unchanged = current is granted if (explicit_revoke and not granted) else bool(current) == granted
        if unchanged:
            continue
        statements.append(ConsentStatement(member_id=member.id, channel=channel, purpose=purpose, granted=granted,
                                           source=source.value, occurred_at=occurred_at, detail="member link"))
        if purpose == Purpose.MARKETING.value:
            events.append(EngagementEvent(
                provider=Provider.MEMBERCARE,
                dedupe_key=stable_key("link", member.id, channel, purpose, granted, occurred_at.isoformat()),
                kind=EventKind.RESUBSCRIBED if granted else EventKind.UNSUBSCRIBED,
                channel=Channel(channel), occurred_at=occurred_at, member_id=member.id,
                raw={"source": source.value, "channel": channel, "purpose": purpose, "granted": granted},
            ))
    if not statements:
        return 0
    record_consents(conn, statements)
    # The consent is already recorded with its own source; the events are for reporting only.
    ingest(conn, events, apply_effects=False)
    return len(statements)


def unsubscribe(conn: Connection, member: MemberView, channels: Iterable[str], *, source: ConsentSource,
                occurred_at: datetime) -> int:
    desired = {(c, Purpose.MARKETING.value): False for c in channels}
    return set_consents(conn, member, desired, source=source, occurred_at=occurred_at, explicit_revoke=True)


def desired_from_form(form: Mapping[str, str]) -> dict[tuple[str, str], bool]:
    """The checkbox grid as submitted: a checked box is present, an unchecked one is absent."""
    return {(c, p): f"consent.{c}.{p}" in form for c in CHANNELS for p in PURPOSES if (c, p) not in LOCKED}
