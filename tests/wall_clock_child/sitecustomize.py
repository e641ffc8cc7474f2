"""Moves a child process's wall clock with the test that started it (``--wall-clock``, tests/clock.py).

While the suite runs with ``--wall-clock``, conftest.py puts this directory on ``PYTHONPATH`` and keeps
``WALL_CLOCK_TRAVEL_OFFSET_S`` at the running test's offset from the real clock. Python imports
``sitecustomize`` at start-up, so every Python child that inherits the environment (the demo, dispatcher
processes, the CLI, a planning pool's spawned workers) starts its own time-machine travel to the same moved
instant, and all processes of a test agree on the time. Prefect's API server is the exception (below).
"""

import os
import sys

_offset = os.environ.get("WALL_CLOCK_TRAVEL_OFFSET_S")
# Prefect's API server stays on the real clock: it computes rate-limit slot decay in SQL against its database's
# now(), which no travel can move, from timestamps its Python writes; moved apart, slots never free (the
# shared rate limits hang) or free at once. Its clients (the flows) may run at a moved time.
_prefect_server = any("prefect.server" in arg for arg in sys.argv)
if _offset and not _prefect_server:
    try:
        import time

        import time_machine
    except ImportError:  # another interpreter without the test extra: say so rather than run at the real time silently
        sys.stderr.write("sitecustomize: WALL_CLOCK_TRAVEL_OFFSET_S is set but time-machine is not installed; "
                         "this process runs at the real time\n")
    else:
        time_machine.travel(time.time() + float(_offset), tick=True).start()
