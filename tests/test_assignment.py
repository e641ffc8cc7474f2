"""Deterministic holdout, global-control and variant assignment; the SQL form agrees with Python."""

import hashlib
import math
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa

from membercare.models import Member
from membercare.optimise import assignment as a

N = 100_000
IDS = list(range(1, N + 1))


def _within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_bucket_is_the_first_52_bits_of_sha256_of_the_domain_separated_key():
    digest = hashlib.sha256(b"holdout\x1fspring-sale\x1f42").digest()
    expected = int.from_bytes(digest[:8], "big") >> 12
    assert a.bucket(a.HOLDOUT, "spring-sale", member_id=42) == expected
    assert a.unit(a.HOLDOUT, "spring-sale", member_id=42) == expected / 2**52
    assert a.in_holdout(42, "spring-sale", 0.2) == (expected < round(0.2 * 2**52))


def test_assignment_is_stable_across_processes():
    # A different process (and hash seed) must hold out exactly the same members.
    code = (
        "from membercare.optimise.assignment import holdout_mask, assign_variants;"
        "import numpy as np;"
        "m = holdout_mask(range(1, 2001), 'weekly-news');"
        "v = assign_variants(list(range(1, 2001)), 'weekly-news', '2026-W05', {'A': .3, 'B': .7});"
        "print(''.join('1' if x else '0' for x in m)); print(''.join(v))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, check=True).stdout.split()
    here_mask = "".join("1" if x else "0" for x in a.holdout_mask(range(1, 2001), "weekly-news"))
    here_var = "".join(a.assign_variants(list(range(1, 2001)), "weekly-news", "2026-W05", {"A": .3, "B": .7}))
    assert out == [here_mask, here_var]


def test_holdout_rate_is_close_to_the_requested_rate():
    mask = a.holdout_mask(IDS, "spring-sale")
    assert _within(mask.mean(), 0.10, N)
    assert _within(a.holdout_mask(IDS, "spring-sale", 0.25).mean(), 0.25, N)
    assert not a.holdout_mask(IDS[:1000], "x", 0.0).any()
    assert a.holdout_mask(IDS[:1000], "x", 1.0).all()


def test_vectorised_and_scalar_forms_agree():
    mask = a.holdout_mask(IDS[:3000], "c1", 0.3)
    assert [a.in_holdout(i, "c1", 0.3) for i in IDS[:3000]] == mask.tolist()
    ctrl = a.global_control_mask(IDS[:3000], "2026")
    assert [a.in_global_control(i, "2026") for i in IDS[:3000]] == ctrl.tolist()
    # String ids hash as their text: "7" and 7 are the same member.
    assert a.in_holdout("7", "c1", 0.3) == a.in_holdout(7, "c1", 0.3)


def test_raising_the_rate_only_adds_members():
    h10 = a.holdout_mask(IDS, "c", 0.10)
    h15 = a.holdout_mask(IDS, "c", 0.15)
    assert np.all(h15[h10])
    assert h15.sum() > h10.sum()


def test_holdouts_of_different_campaigns_and_the_control_group_are_independent():
    h1 = a.holdout_mask(IDS, "campaign-1")
    h2 = a.holdout_mask(IDS, "campaign-2")
    ctrl = a.global_control_mask(IDS, "2026")
    assert _within((h1 & h2).mean(), 0.10 * 0.10, N)
    assert _within((h1 & ctrl).mean(), 0.10 * 0.05, N)
    assert _within(ctrl.mean(), 0.05, N)
    # A new programme salt draws a new control group.
    ctrl2 = a.global_control_mask(IDS, "2027")
    assert _within((ctrl & ctrl2).mean(), 0.05 * 0.05, N)


def test_holdout_is_balanced_over_sequential_ids():
    # Member ids grow with join date: each tenth of the id range must have ~10 % held out.
    mask = a.holdout_mask(IDS, "c")
    for chunk in np.array_split(mask, 10):
        assert _within(chunk.mean(), 0.10, chunk.size)


def test_variants_follow_the_shares_and_ignore_mapping_order():
    shares = {"A": 0.2, "B": 0.5, "C": 0.3, "D": 0.0}
    v = a.assign_variants(IDS, "promo", "2026-03-01", shares)
    counts = Counter(v.tolist())
    assert "D" not in counts
    for name in "ABC":
        assert _within(counts[name] / N, shares[name], N)
    reordered = {"D": 0.0, "C": 0.3, "B": 0.5, "A": 0.2}
    assert np.array_equal(v, a.assign_variants(IDS, "promo", "2026-03-01", reordered))
    assert a.assign_variant(IDS[5], "promo", "2026-03-01", shares) == v[5]
    # Un-normalised weights mean the same shares.
    assert np.array_equal(v, a.assign_variants(IDS, "promo", "2026-03-01", {k: x * 10 for k, x in shares.items()}))


def test_variants_are_redrawn_each_occurrence_independently_of_the_holdout():
    shares = {"A": 0.5, "B": 0.5}
    v1 = a.assign_variants(IDS, "promo", "2026-03-01", shares)
    v2 = a.assign_variants(IDS, "promo", "2026-03-08", shares)
    assert _within((v1 == v2).mean(), 0.5, N)
    hold = a.holdout_mask(IDS, "promo")
    assert _within((v1[hold] == "A").mean(), 0.5, int(hold.sum()))


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="rate"):
        a.in_holdout(1, "c", 1.5)
    with pytest.raises(ValueError, match="separator"):
        a.in_holdout(1, "bad\x1fname")
    with pytest.raises(ValueError, match="not all zero"):
        a.assign_variant(1, "c", "o", {"A": 0.0})
    with pytest.raises(ValueError, match="at least one"):
        a.assign_variant(1, "c", "o", {})


def test_sql_holdout_and_control_agree_with_python(engine):
    a.install_sql_functions(engine)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(sa.insert(Member.__table__), [
            {"external_id": f"m{i}", "name": "x", "joined_at": t0, "tier": "silver", "points_balance": 0,
             "country": "TW", "locale": "zh-TW", "timezone": "Asia/Taipei", "preferred_channels": "email",
             "created_at": t0, "updated_at": t0}
            for i in range(400)
        ])
    m = Member.__table__.c
    with engine.connect() as conn:
        ids = conn.execute(sa.select(m.id).order_by(m.id)).scalars().all()
        held = set(conn.execute(sa.select(m.id).where(a.holdout_clause(m.id, "spring-sale", 0.3))).scalars())
        ctrl = set(conn.execute(sa.select(m.id).where(a.global_control_clause(m.id, "2026", 0.2))).scalars())
        text = conn.execute(sa.select(a.bucket_sql(sa.literal("holdout\x1fé\x1f9")))).scalar_one()
    assert held == {i for i in ids if a.in_holdout(i, "spring-sale", 0.3)}
    assert ctrl == {i for i in ids if a.in_global_control(i, "2026", 0.2)}
    assert 60 < len(held) < 180 and ctrl  # a real split, not all or nothing
    assert text == a.bucket_of_text("holdout\x1fé\x1f9")  # UTF-8 on both sides


def test_variant_picker_matches_assign_variant():
    shares = {"b": 0.6, "a": 0.4, "c": 0.0}
    pick = a.variant_picker("promo", "2026-11", shares)
    got = [pick(m) for m in range(1, 5001)]
    assert got == [a.assign_variant(m, "promo", "2026-11", shares) for m in range(1, 5001)]
    assert "c" not in got and 0.55 < got.count("b") / len(got) < 0.65
    assert a.variant_picker("promo", "2026-11", {"a": 0.0, "b": 1.0})(7) == "b"  # a promoted winner
