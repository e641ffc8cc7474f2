"""One Prefect test harness per test session (it takes ~20 s to start; pay it once).

``conftest.py`` registers this module as a plugin: a test asks for ``prefect_harness`` by parameter, with no
import. Test task bodies with ``task.fn(...)``; run whole flows only for smoke tests.

A module that also imports the fixture gets its own pytest fixture definition, hence its own session-scoped
instance. Only the first instance starts the harness; later ones reuse it. Two harnesses in one process
would leave Prefect's process-wide events worker posting to the first server while the flow runs of the
second are recorded on the second, so task runs counted through the API go missing.
"""

from __future__ import annotations

import os

import pytest

_running = False


@pytest.fixture(scope="session")
def prefect_harness():
    global _running
    if _running:  # started by another module's instance, which stops it last (set up first, torn down last)
        yield
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        _running = True
        try:
            yield
        finally:
            _running = False
