"""Best send hour per member and the next delivery instant (quiet hours, DST, timezones)."""

from datetime import UTC, datetime

import numpy as np
import pytest

from membercare.optimise.send_time import (
    AllowedHours,
    best_hours,
    event_weights,
    hour_histograms,
    kernel_matrix,
    local_hours,
    next_delivery_at,
    next_delivery_times,
)


def test_allowed_hours_and_clamp():
    assert np.flatnonzero(AllowedHours().mask()).tolist() == list(range(9, 21))
    night = AllowedHours(20, 2)
    assert np.flatnonzero(night.mask()).tolist() == [0, 1, 20, 21, 22, 23]
    assert AllowedHours().clamp(3) == 9 and AllowedHours().clamp(22) == 20 and AllowedHours().clamp(12) == 12
    with pytest.raises(ValueError):
        AllowedHours(9, 9)


def test_kernel_wraps_around_midnight_and_preserves_weight():
    k = kernel_matrix(1.5)
    assert k.sum(axis=0) == pytest.approx(np.ones(24))
    assert k[23, 0] == pytest.approx(k[1, 0])  # 23:00 and 01:00 are equally close to midnight


def test_member_hour_from_their_events_segment_fallback_and_quiet_hours():
    # m0: many evening events -> 19/20; m1: a single event at 07:00 -> segment hour; m2: nothing -> segment;
    # m3: active only at 23:00-01:00, entirely in quiet hours -> the nearest allowed hour (20).
    rows = [(0, 19)] * 6 + [(0, 20)] * 5 + [(1, 7)] + [(3, 23)] * 4 + [(3, 0)] * 4 + [(3, 1)] * 2
    rows += [(4, 12)] * 8 + [(5, 13)] * 8  # the rest of segment 0 is lunchtime
    mi, h = zip(*rows, strict=True)
    H = hour_histograms(6, mi, h)
    seg = np.array([0, 0, 0, 1, 0, 0])
    t = best_hours(H, seg)
    assert t.hour[0] in (19, 20) and t.source[0] == "member"
    assert t.hour[1] == t.hour[2] == t.segment_hour[0] and t.source[1] == t.source[2] == "segment"
    assert 12 <= t.segment_hour[0] <= 19  # lunch + evening profile, within allowed hours
    assert t.hour[3] == 20
    assert np.all(AllowedHours().mask()[t.hour])


def test_event_weights_make_purchases_count_more_than_opens():
    kinds = ["open"] * 4 + ["purchase"] * 2
    hours = [10] * 4 + [18] * 2
    H = hour_histograms(1, [0] * 6, hours, event_weights(kinds))
    assert H.sum() == 4 + 6
    assert best_hours(H, [0], bandwidth=0.5).hour[0] == 18
    assert best_hours(hour_histograms(1, [0] * 6, hours), [0], bandwidth=0.5).hour[0] == 10


def test_no_events_anywhere_gives_the_default_hour():
    t = best_hours(np.zeros((3, 24)), [0, 1, 1], allowed=AllowedHours(12, 18), default_hour=10)
    assert t.hour.tolist() == [12, 12, 12] and set(t.source) == {"default"}


def test_local_hours_use_each_members_timezone():
    instants = [datetime(2026, 3, 1, 12, tzinfo=UTC)] * 3
    assert local_hours(instants, ["Asia/Taipei", "Europe/Berlin", "America/New_York"]).tolist() == [20, 13, 7]


def test_next_delivery_today_tomorrow_or_now():
    now = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)  # 10:30 in Taipei
    assert next_delivery_at(now, "Asia/Taipei", 19) == datetime(2026, 3, 1, 11, tzinfo=UTC)
    assert next_delivery_at(now, "Asia/Taipei", 9) == datetime(2026, 3, 2, 1, tzinfo=UTC)
    assert next_delivery_at(now, "Asia/Taipei", 10) == now  # inside the best hour: send now
    for h in range(24):
        t = next_delivery_at(now, "Europe/Berlin", h)
        assert now <= t < datetime(2026, 3, 2, 2, 30, tzinfo=UTC)
        assert t.tzinfo == UTC


def test_next_delivery_across_dst_changes():
    # New York springs forward on 2026-03-08 (02:00 -> 03:00) and falls back on 2026-11-01.
    before_spring = datetime(2026, 3, 7, 20, tzinfo=UTC)  # 15:00 EST
    t = next_delivery_at(before_spring, "America/New_York", 9)
    assert t == datetime(2026, 3, 8, 13, tzinfo=UTC)  # 09:00 EDT
    before_fall = datetime(2026, 10, 31, 20, tzinfo=UTC)  # 16:00 EDT
    t = next_delivery_at(before_fall, "America/New_York", 9)
    assert t == datetime(2026, 11, 1, 14, tzinfo=UTC)  # 09:00 EST
    with pytest.raises(ValueError):
        next_delivery_at(datetime(2026, 1, 1), "UTC", 9)  # naive
    with pytest.raises(ValueError):
        next_delivery_at(before_fall, "UTC", 24)


def test_batch_next_delivery_matches_single():
    now = datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
    tzs = ["Asia/Taipei", "Asia/Taipei", "Europe/London"]
    hours = [20, 9, 9]
    expected = [next_delivery_at(now, tz, h) for tz, h in zip(tzs, hours, strict=True)]
    assert next_delivery_times(now, tzs, hours) == expected


def test_whole_day_and_hours_outside_quiet_hours():
    from datetime import time

    assert AllowedHours(0, 24).mask().all()
    assert (lambda h: (h.start, h.end))(AllowedHours.outside(time(21), time(9))) == (9, 21)
    assert (lambda h: (h.start, h.end))(AllowedHours.outside(time(21, 30), time(8, 30))) == (9, 21)
    assert (lambda h: (h.start, h.end))(AllowedHours.outside(time(1), time(5))) == (5, 1)  # wraps midnight
    assert AllowedHours.outside(None, None).mask().all()
    with pytest.raises(ValueError):
        AllowedHours(5, 5)


def test_scoring_in_chunks_with_shared_profiles_equals_scoring_everyone():
    from membercare.optimise.send_time import profiles_from_totals

    rng = np.random.default_rng(3)
    n = 600
    seg = rng.integers(0, 4, n)
    centre = np.array([9, 13, 18, 20])[seg]
    counts = rng.poisson(1.0, n)
    rows = [(m, int((centre[m] + rng.integers(-2, 3)) % 24)) for m in range(n) for _ in range(counts[m])]
    H = hour_histograms(n, [r[0] for r in rows], [r[1] for r in rows])
    whole = best_hours(H, seg, n_segments=4)
    totals = np.zeros((4, 24))
    np.add.at(totals, seg, H)
    prof = profiles_from_totals(totals)
    parts = [best_hours(H[i:i + 97], seg[i:i + 97], profiles=prof) for i in range(0, n, 97)]
    assert np.array_equal(np.concatenate([p.hour for p in parts]), whole.hour)
    assert np.array_equal(prof.hour, whole.segment_hour)
