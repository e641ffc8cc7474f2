"""Best send hour per member, and the next delivery time at that hour.

Evidence: the local hours (in the member's own timezone) of past opens, clicks and purchases, weighted
by how strongly they signal attention (defaults: open 1, click 2, purchase 3). Per member we build a
24-bin histogram and smooth it with a wrapped Gaussian kernel (σ = 1.5 h by default), because 23:00 and
00:00 are neighbours and a member who opened at 19:00 and 21:00 is most likely reachable at 20:00.

Few events are noisy, so the member's smoothed histogram ``h_m`` is combined with their segment's
normalised profile ``q_s`` (the pooled, smoothed histogram of all members of the segment) as a
Dirichlet-style prior of ``prior_weight`` pseudo-events::

    score_m(h) = h_m(h) + prior_weight · q_s(h)

A member with no history gets exactly the segment's typical hour; one with many events gets their own.
The best hour is the argmax of ``score`` **over allowed hours only** (outside quiet hours; default
09:00-21:00 local, i.e. hours 9..20), so the result can never fall into quiet hours.
:func:`next_delivery_at` turns a best hour into the next aware-UTC instant at that local hour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import SupportsInt
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from membercare.timeutil import UTC, ensure_utc

HOURS = 24
DEFAULT_WEIGHTS = {"open": 1.0, "click": 2.0, "purchase": 3.0}
DEFAULT_BANDWIDTH = 1.5
DEFAULT_PRIOR_WEIGHT = 3.0
DEFAULT_MIN_EVENTS = 3
DEFAULT_HOUR = 10


@dataclass(frozen=True)
class AllowedHours:
    """Local hours in which marketing may be delivered: ``start <= hour < end`` (wraps past midnight
    when ``start > end``, e.g. ``AllowedHours(20, 2)`` allows 20:00-01:59; ``AllowedHours(0, 24)`` is
    the whole day)."""

    start: int = 9
    end: int = 21

    def __post_init__(self):
        whole_day = self.start == 0 and self.end == HOURS
        if not (0 <= self.start < HOURS and 0 <= self.end <= HOURS) or (self.start == self.end % HOURS
                                                                           and not whole_day):
            raise ValueError(f"invalid allowed hours {self.start}-{self.end}")

    @classmethod
    def outside(cls, quiet_start: time | None, quiet_end: time | None) -> AllowedHours:
        """The whole local hours outside quiet hours ``[quiet_start, quiet_end)`` (which may wrap midnight).

        An hour is allowed only if all of it is outside: quiet hours 21:30-08:30 allow 09:00-20:59.
        ``None`` (no quiet hours) allows the whole day.
        """
        if quiet_start is None or quiet_end is None:
            return cls(0, HOURS)
        start = quiet_end.hour + (1 if (quiet_end.minute or quiet_end.second) else 0)
        end = quiet_start.hour
        start %= HOURS
        if start == end % HOURS:
            raise ValueError(f"quiet hours {quiet_start}-{quiet_end} leave no whole hour to deliver in")
        return cls(start, end if end else HOURS) if start < (end or HOURS) else cls(start, end)

    def mask(self) -> np.ndarray:
        h = np.arange(HOURS)
        if self.start < self.end:
            return (h >= self.start) & (h < self.end)
        return (h >= self.start) | (h < self.end)

    def clamp(self, hour: int) -> int:
        """The allowed hour nearest to ``hour`` on the clock (ties go to the later hour)."""
        m = self.mask()
        if m[hour % HOURS]:
            return hour % HOURS
        allowed = np.flatnonzero(m)
        d = np.abs(allowed - hour % HOURS)
        circ = np.minimum(d, HOURS - d)
        best = np.flatnonzero(circ == circ.min())
        return int(allowed[best[-1]])


def kernel_matrix(bandwidth: float = DEFAULT_BANDWIDTH) -> np.ndarray:
    """24 x 24 circulant smoothing matrix; each column sums to 1 (total weight is preserved)."""
    if bandwidth <= 0:
        return np.eye(HOURS)
    d = np.abs(np.arange(HOURS)[:, None] - np.arange(HOURS)[None, :])
    d = np.minimum(d, HOURS - d)
    k = np.exp(-0.5 * (d / bandwidth) ** 2)
    return k / k.sum(axis=0, keepdims=True)


def hour_histograms(n_members: int, member_index: npt.ArrayLike, local_hour: npt.ArrayLike,
                    weight: npt.ArrayLike | None = None) -> npt.NDArray[np.float64]:
    """``(members, 24)`` weighted counts from long-form events (member index, local hour 0-23, weight)."""
    mi = np.asarray(member_index, dtype=np.int64)
    h = np.asarray(local_hour, dtype=np.int64)
    if np.any((h < 0) | (h >= HOURS)):
        raise ValueError("local hours must be in 0..23")
    w = np.ones(mi.size) if weight is None else np.asarray(weight, dtype=float)
    out = np.zeros((n_members, HOURS))
    np.add.at(out, (mi, h), w)
    return out


def event_weights(kinds: Iterable[str], weights: Mapping[str, float] | None = None) -> npt.NDArray[np.float64]:
    """Per-event weights from event kinds (``open``/``click``/``purchase``); unknown kinds weigh 1."""
    table = DEFAULT_WEIGHTS if weights is None else weights
    return np.array([float(table.get(k, 1.0)) for k in kinds])


def local_hours(instants_utc: Iterable[datetime], timezones: Iterable[str]) -> npt.NDArray[np.int64]:
    """The local hour of each aware instant in the matching IANA zone (vectorised per zone)."""
    instants = list(instants_utc)
    tzs = np.asarray(list(timezones), dtype=object)
    out = np.empty(len(instants), dtype=np.int64)
    for tz in set(tzs.tolist()):
        zone = ZoneInfo(tz)
        for i in np.flatnonzero(tzs == tz):
            out[i] = ensure_utc(instants[i]).astimezone(zone).hour
    return out


@dataclass(frozen=True)
class SendTimes:
    hour: np.ndarray  # best local hour per member (always allowed)
    source: np.ndarray  # "member" (own data, >= min_events) / "segment" (fallback) / "default"
    events: np.ndarray  # weighted event count per member
    segment_hour: np.ndarray  # the segment's typical allowed hour, per segment code


@dataclass(frozen=True)
class GroupProfiles:
    """Normalised, smoothed hour profiles of member groups (segments), the fallback of :func:`best_hours`.

    ``profile[s]`` sums to 1; ``hour[s]`` is the group's typical (highest) allowed hour. A group with no
    events has the population profile; ``has_data`` is False when nobody has any events, in which case
    every profile puts all weight on the default hour.
    """

    profile: np.ndarray  # (groups, 24)
    hour: np.ndarray  # (groups,)
    has_data: bool


def profiles_from_totals(totals: np.ndarray, *, allowed: AllowedHours = AllowedHours(),
                         bandwidth: float = DEFAULT_BANDWIDTH, default_hour: int = DEFAULT_HOUR) -> GroupProfiles:
    """:class:`GroupProfiles` from raw weighted event counts per group and local hour (``(groups, 24)``),
    e.g. a SQL ``GROUP BY`` over the whole history, so that members can then be scored in chunks."""
    T = np.asarray(totals, dtype=float)
    if T.ndim != 2 or T.shape[1] != HOURS:
        raise ValueError("totals must have shape (groups, 24)")
    seg_tot = T @ kernel_matrix(bandwidth).T
    pop = seg_tot.sum(axis=0)
    fallback = allowed.clamp(default_hour)
    if pop.sum() > 0:
        pop_profile = pop / pop.sum()
    else:
        pop_profile = np.zeros(HOURS)
        pop_profile[fallback] = 1.0
    sums = seg_tot.sum(axis=1, keepdims=True)
    profile = np.where(sums > 0, seg_tot / np.where(sums > 0, sums, 1.0), pop_profile)
    hour = np.where(allowed.mask(), profile, -np.inf).argmax(axis=1) if len(profile) else np.zeros(0, np.int64)
    return GroupProfiles(profile=profile, hour=hour.astype(np.int64), has_data=bool(pop.sum() > 0))


def best_hours(
    histograms: np.ndarray,
    segment: npt.ArrayLike,
    *,
    n_segments: int | None = None,
    allowed: AllowedHours = AllowedHours(),
    bandwidth: float = DEFAULT_BANDWIDTH,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    min_events: float = DEFAULT_MIN_EVENTS,
    default_hour: int = DEFAULT_HOUR,
    profiles: GroupProfiles | None = None,
) -> SendTimes:
    """Best allowed local send hour per member (see the module docstring).

    ``segment`` is an integer code per member (any grouping: the campaign segment, age group, ...).
    A segment with no events at all uses the population profile; with no events anywhere every member
    gets ``default_hour`` (clamped into the allowed hours). ``profiles`` gives the segments' profiles
    computed elsewhere (:func:`profiles_from_totals` over everyone), so that a large population can be
    scored in chunks; by default they come from ``histograms`` themselves.
    """
    H = np.asarray(histograms, dtype=float)
    if H.ndim != 2 or H.shape[1] != HOURS:
        raise ValueError("histograms must have shape (members, 24)")
    seg = np.asarray(segment, dtype=np.int64)
    mask = allowed.mask()
    K = kernel_matrix(bandwidth)
    smooth = H @ K.T  # row m: sum_j H[m, j] * K[:, j]
    if profiles is None:
        S = (int(seg.max()) + 1 if seg.size else 0) if n_segments is None else int(n_segments)
        totals = np.zeros((S, HOURS))
        np.add.at(totals, seg, H)
        profiles = profiles_from_totals(totals, allowed=allowed, bandwidth=bandwidth, default_hour=default_hour)
    profile, segment_hour = profiles.profile, profiles.hour

    score = smooth + prior_weight * profile[seg]
    hour = np.where(mask, score, -np.inf).argmax(axis=1)
    events = H.sum(axis=1)
    source = np.where(events >= min_events, "member", "segment").astype(object)
    if not profiles.has_data:
        source[:] = "default"
        hour = segment_hour[seg] if seg.size else hour
    else:
        # Members with too little data take their segment's hour outright (no member-level noise).
        hour = np.where(events >= min_events, hour, segment_hour[seg])
    return SendTimes(hour=np.asarray(hour, dtype=np.int64), source=source, events=events, segment_hour=segment_hour)


def next_delivery_at(now: datetime, timezone: str, hour: int, *, minute: int = 0) -> datetime:
    """The next aware-UTC instant at ``hour:minute`` local time in ``timezone``.

    If ``now`` is already inside that hour (``hour:minute <= local now < hour+1:00``) the answer is
    ``now``: the member is in their best hour, deliver immediately rather than a day later. Otherwise it
    is today's or tomorrow's ``hour:minute``, which is at most 24 h away (25 h across a DST fall-back).
    A wall time skipped by a DST spring-forward resolves to the instant one hour later on the clock
    (zoneinfo's ``fold=0`` rule), still within the allowed window.
    """
    if not (0 <= hour < HOURS and 0 <= minute < 60):
        raise ValueError(f"invalid local time {hour}:{minute}")
    now = ensure_utc(now)
    zone = ZoneInfo(timezone)
    local = now.astimezone(zone)
    start = datetime(local.year, local.month, local.day, hour, minute, tzinfo=zone)
    if start.astimezone(UTC) <= now and local.hour == hour:
        return now
    if start.astimezone(UTC) > now:
        return start.astimezone(UTC)
    d = local.date() + timedelta(days=1)
    return datetime(d.year, d.month, d.day, hour, minute, tzinfo=zone).astimezone(UTC)


def next_delivery_times(now: datetime, timezones: Iterable[str], hours: Iterable[SupportsInt]) -> list[datetime]:
    """:func:`next_delivery_at` for many members; computed once per distinct (timezone, hour)."""
    tzs, hs = list(timezones), [int(h) for h in hours]
    if len(tzs) != len(hs):
        raise ValueError("timezones and hours must have the same length")
    cache: dict[tuple[str, int], datetime] = {}
    out = []
    for tz, h in zip(tzs, hs, strict=True):
        key = (tz, h)
        if key not in cache:
            cache[key] = next_delivery_at(now, tz, h)
        out.append(cache[key])
    return out
