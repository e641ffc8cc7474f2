"""SMS segment counts of sent messages, cached in ``sms_message_segments`` so reports can sum them in SQL.

An SMS's segment count (GSM-7: 160 characters, 153 per part when concatenated; UCS-2: 70 / 67) is what
the carrier bills. Planning stores it inside the rendered content (``outbox_messages.content``, zlib-
compressed JSON), which SQL cannot read, so each sent SMS is decoded once here, in id order and in
batches, and only rows without a cached count are read: a refresh after a campaign costs one decode per
new message, and reports then join the cache like any other table.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.db import insert_for
from membercare.delivery.contract import SmsContent
from membercare.delivery.models import OutboxMessage, OutboxState, decode_contents
from membercare.engagement.attribution_models import SmsMessageSegments
from membercare.models import Channel

BATCH = 2000


def refresh_sms_segments(engine: Engine, *, batch_size: int = BATCH) -> int:
    """Cache the segment count of every sent SMS that has none yet; returns how many were added."""
    o, s = OutboxMessage.__table__, SmsMessageSegments.__table__
    added, last_id = 0, 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(o.c.id, o.c.message_id, o.c.content)
                .where(o.c.channel == Channel.SMS.value, o.c.state == OutboxState.SENT.value, o.c.id > last_id,
                       ~sa.exists().where(s.c.message_id == o.c.message_id))
                .order_by(o.c.id).limit(batch_size)
            ).all()
        if not rows:
            return added
        last_id = rows[-1].id
        values = []
        for r in rows:
            content = decode_contents(r.content).get(Channel.SMS.value)
            # A row without SMS content (should not happen for a sent SMS) counts as one segment: the
            # provider bills at least one.
            segments = content.segments if isinstance(content, SmsContent) else 1
            values.append(dict(message_id=r.message_id, segments=max(1, int(segments))))
        with engine.begin() as conn:
            ins = insert_for(conn, s).on_conflict_do_nothing(index_elements=["message_id"])
            conn.execute(ins, values)
        added += len(values)
