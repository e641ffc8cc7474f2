"""Unsubscribe and complaint rates against message frequency, to set the frequency cap from evidence.

Unit of analysis: the **member-week** (UTC ISO weeks, Monday 00:00). For every member who received at
least one marketing message in a week we know how many they received, and whether they unsubscribed
(on any channel) or complained (spam report) in that week. Member-weeks are bucketed by messages
received (default buckets 1, 2, 3, 4, 5, 6-7, 8+) and each bucket reports

* ``unsubscribe_rate``: unsubscribing member-weeks / member-weeks, with a Wilson 95 % interval;
* ``complaint_rate``: the same for complaints;
* the same counts per 1,000 messages, which is how providers quote complaint thresholds.

This is observational: members who get more messages may differ (more segments, more engaged), so a
rising curve is evidence, not proof, of fatigue. The cleanest reading compares neighbouring buckets;
a randomised cap test (a holdout at a lower cap) answers it causally.
:func:`highest_safe_frequency` reads the table conservatively (upper confidence bounds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from itertools import pairwise
from typing import SupportsInt

import numpy as np
import numpy.typing as npt

from membercare.optimise.lift import wilson_interval
from membercare.timeutil import ensure_utc

DEFAULT_EDGES = (1, 2, 3, 4, 5, 6, 8)  # bucket i is [edges[i], edges[i+1]); the last is open-ended

_EPOCH_MONDAY = np.datetime64("1970-01-05")  # the first Monday after the Unix epoch


def week_index(instants: Iterable[datetime]) -> npt.NDArray[np.int64]:
    """ISO week number since 1970-01-05 (Monday) of aware datetimes, in UTC. Vectorised."""
    arr = np.array([ensure_utc(t).replace(tzinfo=None) for t in instants], dtype="datetime64[s]")
    days = (arr - _EPOCH_MONDAY).astype("timedelta64[D]").astype(np.int64)
    return np.floor_divide(days, 7)


def week_start(index: int) -> datetime:
    from membercare.timeutil import UTC

    return (_EPOCH_MONDAY + np.timedelta64(int(index) * 7, "D")).astype("datetime64[s]").item().replace(tzinfo=UTC)


@dataclass(frozen=True)
class MemberWeeks:
    """One row per member-week with at least one message."""

    member: np.ndarray
    week: np.ndarray
    messages: np.ndarray
    unsubscribed: np.ndarray  # bool
    complained: np.ndarray  # bool


def member_weeks(sent_member: Iterable[int], sent_at: Iterable[datetime], unsub_member: Iterable[int] = (),
                 unsub_at: Iterable[datetime] = (), complaint_member: Iterable[int] = (),
                 complaint_at: Iterable[datetime] = ()) -> MemberWeeks:
    """Build member-week rows from raw message and outcome events (member ids + aware timestamps).

    Unsubscribes/complaints in a week in which the member received no message are not attributed to
    any frequency bucket (they cannot be the effect of that week's frequency) and are dropped.
    """
    sm = np.asarray(list(sent_member), dtype=np.int64)
    sw = week_index(sent_at)
    if sm.size != sw.size:
        raise ValueError("sent_member and sent_at must have the same length")
    if sm.size == 0:
        empty = np.zeros(0, np.int64)
        return MemberWeeks(empty, empty, empty, np.zeros(0, bool), np.zeros(0, bool))
    pairs, counts = np.unique(np.stack([sm, sw], axis=1), axis=0, return_counts=True)

    def flag(members: Iterable[int], instants: Iterable[datetime]) -> np.ndarray:
        m = np.asarray(list(members), dtype=np.int64)
        if m.size == 0:
            return np.zeros(len(pairs), bool)
        w = week_index(instants)
        ev = np.unique(np.stack([m, w], axis=1), axis=0)
        # Row-wise membership via a structured view of the (member, week) pairs.
        dt = np.dtype([("m", np.int64), ("w", np.int64)])
        return np.isin(np.ascontiguousarray(pairs).view(dt).ravel(), np.ascontiguousarray(ev).view(dt).ravel())

    return MemberWeeks(
        member=pairs[:, 0], week=pairs[:, 1], messages=counts.astype(np.int64),
        unsubscribed=flag(unsub_member, unsub_at), complained=flag(complaint_member, complaint_at),
    )


@dataclass(frozen=True)
class FrequencyBucket:
    label: str
    min_messages: int
    max_messages: int | None  # inclusive; None = open-ended
    member_weeks: int
    messages: int
    unsubscribes: int
    complaints: int
    unsubscribe_rate: float
    unsubscribe_rate_ci: tuple[float, float]
    complaint_rate: float
    complaint_rate_ci: tuple[float, float]
    unsubscribes_per_1000_messages: float
    complaints_per_1000_messages: float

    def to_dict(self) -> dict:
        return asdict(self)


def frequency_table(messages: npt.ArrayLike, unsubscribed: npt.ArrayLike, complained: npt.ArrayLike, *,
                    edges: Sequence[int] = DEFAULT_EDGES, confidence: float = 0.95) -> list[FrequencyBucket]:
    """The rate table from per-member-week arrays, one row per bucket (empty buckets included, with nan rates)."""
    msg = np.asarray(messages, dtype=np.int64)
    uns = np.asarray(unsubscribed, dtype=bool)
    com = np.asarray(complained, dtype=bool)
    if not (msg.shape == uns.shape == com.shape):
        raise ValueError("messages, unsubscribed and complained must have the same length")
    if msg.size == 0:
        return frequency_table_from_counts([], edges=edges, confidence=confidence)
    values, inverse = np.unique(msg, return_inverse=True)
    n = np.bincount(inverse, minlength=values.size)
    u = np.bincount(inverse, weights=uns, minlength=values.size)
    c = np.bincount(inverse, weights=com, minlength=values.size)
    counts = [(int(values[i]), int(n[i]), int(u[i]), int(c[i])) for i in range(values.size)]
    return frequency_table_from_counts(counts, edges=edges, confidence=confidence)


def frequency_table_from_counts(counts: Iterable[Sequence[SupportsInt]], *, edges: Sequence[int] = DEFAULT_EDGES,
                                confidence: float = 0.95) -> list[FrequencyBucket]:
    """The rate table from aggregates: ``(messages, member_weeks, unsubscribing member-weeks, complaining
    member-weeks)`` per exact weekly message count, as one SQL ``GROUP BY messages`` returns them (the report
    uses this, so no member-week is loaded into Python)."""
    edges = [int(e) for e in edges]
    if not edges or edges[0] < 1 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError("edges must be strictly increasing integers >= 1")
    rows_in = []
    for messages, weeks, unsubs, complaints in counts:
        messages, weeks, unsubs, complaints = int(messages), int(weeks), int(unsubs), int(complaints)
        if messages < 1 or weeks < 0 or not (0 <= unsubs <= weeks and 0 <= complaints <= weeks):
            raise ValueError(f"inconsistent counts for {messages} messages: {weeks} member-weeks, "
                             f"{unsubs} unsubscribes, {complaints} complaints")
        rows_in.append((messages, weeks, unsubs, complaints))
    rows = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] - 1 if i + 1 < len(edges) else None
        sel = [r for r in rows_in if r[0] >= lo and (hi is None or r[0] <= hi)]
        n = sum(r[1] for r in sel)
        m = sum(r[0] * r[1] for r in sel)
        u = sum(r[2] for r in sel)
        c = sum(r[3] for r in sel)
        label = f"{lo}+" if hi is None else (str(lo) if hi == lo else f"{lo}-{hi}")
        rows.append(FrequencyBucket(
            label=label, min_messages=lo, max_messages=hi, member_weeks=n, messages=m,
            unsubscribes=u, complaints=c,
            unsubscribe_rate=u / n if n else float("nan"),
            unsubscribe_rate_ci=wilson_interval(u, n, confidence),
            complaint_rate=c / n if n else float("nan"),
            complaint_rate_ci=wilson_interval(c, n, confidence),
            unsubscribes_per_1000_messages=1000.0 * u / m if m else float("nan"),
            complaints_per_1000_messages=1000.0 * c / m if m else float("nan"),
        ))
    return rows


def highest_safe_frequency(table: Sequence[FrequencyBucket], *, max_unsubscribe_rate: float,
                           max_complaint_rate: float | None = None, min_member_weeks: int = 100) -> int | None:
    """The largest weekly message count whose bucket, and every lower bucket, keeps the *upper* 95 %
    bound of the weekly unsubscribe (and complaint) rate under the given ceilings.

    Buckets with fewer than ``min_member_weeks`` stop the scan (too little evidence to allow more).
    Returns None when even the first bucket fails. For an open-ended last bucket, its lower edge is
    returned (evidence says nothing about how far beyond it is safe).
    """
    safe = None
    for row in table:
        if row.member_weeks < min_member_weeks:
            break
        if row.unsubscribe_rate_ci[1] > max_unsubscribe_rate:
            break
        if max_complaint_rate is not None and row.complaint_rate_ci[1] > max_complaint_rate:
            break
        safe = row.max_messages if row.max_messages is not None else row.min_messages
    return safe
