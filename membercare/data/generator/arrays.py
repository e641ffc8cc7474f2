"""Vectorised helpers: timestamps as stored text, categorical draws, per-member segments of arrays, codes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from membercare.data.generator.model import DAY, SHOP_OFFSET


def fmt_ts(seconds: np.ndarray) -> list:
    """Epoch seconds -> 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's SQLite DATETIME text); -1 -> None.

    PostgreSQL reads the same text (the COPY session runs in UTC).
    """
    seconds = np.asarray(seconds, dtype=np.int64)
    text = np.datetime_as_string(seconds.astype("datetime64[s]").astype("datetime64[us]"), unit="us")
    text = np.ascontiguousarray(text, dtype="U26")
    text.view(np.uint32).reshape(-1, 26)[:, 10] = ord(" ")  # ISO 'T' -> ' ', in place
    out = text.tolist()
    if (seconds < 0).any():
        for i in np.flatnonzero(seconds < 0).tolist():
            out[i] = None
    return out


def choice(rng: np.random.Generator, weights: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return rng.choice(len(w), size=size, p=w / w.sum())


def row_choice(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (rows sum to 1)."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), probs.shape[1] - 1)


def seg_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def seg_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment (segments are consecutive runs of ``counts``)."""
    cs = np.cumsum(values)
    before = np.concatenate([[0], cs])[seg_starts(counts)]
    return cs - np.repeat(before, counts)


def local_day_start(t: np.ndarray) -> np.ndarray:
    return (t + SHOP_OFFSET) // DAY * DAY - SHOP_OFFSET


# Share of shop traffic per local hour: quiet nights, a lunch bump and an evening peak.
_DIURNAL = np.array([2, 1.2, .7, .4, .3, .4, .8, 1.5, 2.5, 3, 3.2, 3.6, 4.2, 3.8, 3.3, 3.2, 3.4, 3.6, 4, 4.8,
                     5.6, 6, 5.4, 3.8])


def time_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = choice(rng, _DIURNAL, n)
    return hour * 3600 + rng.integers(0, 3600, n)


_BASE32 = np.frombuffer("23456789ABCDEFGHJKLMNPQRSTUVWXYZ".encode("utf-32-le"), dtype=np.uint32)


def base32(values: np.ndarray, width: int) -> list[str]:
    """Fixed-width base-32 codes without 0/O and 1/I (codes are typed in by people)."""
    v = np.asarray(values).astype(np.int64)
    digits = (v[:, None] // (32 ** np.arange(width - 1, -1, -1, dtype=np.int64))) % 32
    return np.ascontiguousarray(_BASE32[digits]).view(f"U{width}").ravel().tolist()


def permute(values: np.ndarray, modulus: int, salt: int) -> np.ndarray:
    """An affine bijection of [0, modulus) onto itself: distinct inputs give distinct outputs that look random."""
    mult = 2_654_435_761 % modulus  # Knuth's multiplicative constant, nudged to be coprime with the modulus
    while math.gcd(mult, modulus) != 1:
        mult += 1
    if modulus > 2**31:  # the product could overflow int64: exact Python integers
        return (values.astype(object) * mult + salt) % modulus
    return (values.astype(np.int64) * mult + salt) % modulus
