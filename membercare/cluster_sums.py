"""Per-member sufficient statistics of a rate: what a member-clustered interval needs, in six sums.

Kept below every layer (numpy only) so that the journeys' funnel and the reports share one type; the
statistics built on it (intervals, tests) are in :mod:`membercare.reports.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class ClusterSums:
    """Per-arm sufficient statistics over members: ``n`` members, sums of rows ``m``, successes ``y`` and products."""

    n: int
    m: float
    y: float
    mm: float
    ym: float
    yy: float

    @classmethod
    def from_arrays(cls, successes: ArrayLike, rows: ArrayLike) -> ClusterSums:
        y, m = np.asarray(successes, dtype=float), np.asarray(rows, dtype=float)
        if y.shape != m.shape or np.any(m < 0) or np.any(y < 0):
            raise ValueError("successes and rows need the same shape and no negative counts")
        return cls(int(y.size), float(m.sum()), float(y.sum()), float((m * m).sum()), float((y * m).sum()),
                   float((y * y).sum()))

    @property
    def rate(self) -> float:
        return self.y / self.m if self.m > 0 else math.nan

    def naive_variance(self) -> float:
        """Binomial variance of the rate, every row independent."""
        p = self.rate
        return p * (1.0 - p) / self.m if self.m > 0 else math.nan

    def clustered_variance(self) -> float:
        """Cluster-robust (CR1) variance of the ratio estimator, members as clusters."""
        if self.n < 2 or self.m <= 0:
            return math.nan
        p = self.rate
        resid = max(self.yy - 2.0 * p * self.ym + p * p * self.mm, 0.0)
        return self.n / (self.n - 1.0) * resid / self.m ** 2


__all__ = ["ClusterSums"]
