"""One Prefect test harness per test session (it takes ~20 s to start; pay it once).

Import with ``from prefect_fixtures import prefect_harness`` (or move into conftest.py). Test task bodies
with ``task.fn(...)``; run whole flows only for smoke tests.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
