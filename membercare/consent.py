"""Consent: an append-only history plus the current state, written together.

Every statement ("member M granted/revoked channel C for purpose P at time T, via source S") is
appended to ``consent_events`` once (a repeated statement, e.g. a re-import or a webhook retry, is
ignored by a unique constraint) and folded into ``consents`` only if it is at least as recent as
the state there, so that out-of-order arrivals cannot resurrect an old state.

This is the one place that writes consent; import, the generator, the webhook receiver and the
preference centre all call :func:`record_consents`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare import signals
from membercare.db import insert_for
from membercare.models import Channel, Consent, ConsentEvent, ConsentSource, Purpose
from membercare.timeutil import ensure_utc, utcnow


@dataclass(frozen=True)
class ConsentStatement:
    member_id: int
    channel: str
    purpose: str
    granted: bool
    source: str
    occurred_at: datetime
    detail: str | None = None

    def __post_init__(self) -> None:
        Channel(self.channel)
        Purpose(self.purpose)
        ensure_utc(self.occurred_at)


def record_consents(conn: Connection, statements: Sequence[ConsentStatement]) -> int:
    """Append the statements to the history and fold them into the current state.

    Returns how many statements were new. Runs inside the caller's transaction.
    """
    if not statements:
        return 0
    now = utcnow()
    ev = ConsentEvent.__table__
    rows = [
        dict(member_id=s.member_id, channel=s.channel, purpose=s.purpose, granted=s.granted, source=s.source,
             occurred_at=s.occurred_at, recorded_at=now, detail=s.detail)
        for s in statements
    ]
    ins = insert_for(conn, ev).on_conflict_do_nothing(
        index_elements=["member_id", "channel", "purpose", "occurred_at", "granted"]
    )
    # RETURNING (batched by SQLAlchemy's insertmanyvalues) tells us which statements were new.
    inserted = conn.execute(ins.returning(ev.c.member_id, ev.c.channel, ev.c.purpose, ev.c.granted, ev.c.source),
                            rows).all()
    new = len(inserted)
    _signal_opt_outs_on_commit(conn, [r for r in inserted if not r.granted and r.source not in _BULK_SOURCES])

    # Latest statement per key within this batch wins.
    latest: dict[tuple[int, str, str], ConsentStatement] = {}
    for s in statements:
        key = (s.member_id, s.channel, s.purpose)
        if key not in latest or s.occurred_at >= latest[key].occurred_at:
            latest[key] = s
    cur = Consent.__table__
    up = insert_for(conn, cur)
    up = up.on_conflict_do_update(
        index_elements=["member_id", "channel", "purpose"],
        set_={"granted": up.excluded.granted, "source": up.excluded.source, "changed_at": up.excluded.changed_at},
        where=up.excluded.changed_at >= cur.c.changed_at,
    )
    conn.execute(
        up,
        [
            dict(member_id=s.member_id, channel=s.channel, purpose=s.purpose, granted=s.granted, source=s.source,
                 changed_at=s.occurred_at)
            for s in latest.values()
        ],
    )
    return new


# Sources that change many members at once (a file import, generated data): no signal per member.
_BULK_SOURCES = frozenset({ConsentSource.IMPORT.value, ConsentSource.GENERATED.value})


def _signal_opt_outs_on_commit(conn: Connection, opt_outs: Sequence[sa.Row]) -> None:
    """Tell operations about members' own opt-outs when the transaction that records them commits (announced as
    the commit starts: a commit that then fails is rare, and a signal is advisory; a rollback announces nothing)."""
    if not opt_outs:
        return

    def emit(_conn: Connection) -> None:
        for r in opt_outs:
            signals.emit(signals.MEMBER_UNSUBSCRIBED, signals.member_resource(r.member_id),
                         {"channel": r.channel, "purpose": r.purpose, "source": r.source})

    sa.event.listen(conn, "commit", emit, once=True)


def current_consents(conn: Connection, member_id: int) -> dict[tuple[str, str], bool]:
    """``{(channel, purpose): granted}`` for one member."""
    t = Consent.__table__
    rows = conn.execute(sa.select(t.c.channel, t.c.purpose, t.c.granted).where(t.c.member_id == member_id))
    return {(r.channel, r.purpose): bool(r.granted) for r in rows}
