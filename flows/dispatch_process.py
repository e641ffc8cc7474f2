"""A dispatcher process whose rate limits are shared through Prefect global concurrency limits.

``membercare.delivery.pool`` runs dispatcher processes and knows nothing of Prefect; when a dispatch has
orchestrator-wide limits, the flow starts its processes with this module (``python -m flows.dispatch_process``),
which hands the core a factory for :class:`flows.ratelimits.SharedRateLimiter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flows.ratelimits import SharedRateLimiter
from membercare.delivery import pool


def shared_limiter(spec: Mapping[str, Any]) -> SharedRateLimiter:
    return SharedRateLimiter(spec["name"], limit=int(spec["limit"]), rate=float(spec["rate"]))


if __name__ == "__main__":
    pool.main(shared_limiter)
