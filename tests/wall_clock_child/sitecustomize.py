"""Moves a child process's wall clock with the test that started it (``--wall-clock``, tests/clock.py).

While the suite runs with ``--wall-clock``, conftest.py puts this directory on ``PYTHONPATH`` and keeps
``WALL_CLOCK_TRAVEL_OFFSET_S`` at the running test's offset from the real clock. Python imports
``sitecustomize`` at start-up, so every Python child that inherits the environment (the demo, dispatcher
processes, the CLI, Prefect's test server, a planning pool's spawned workers) starts its own time-machine
travel to the same moved instant, and all processes of a test agree on the time.
"""

import os
import sys

_offset = os.environ.get("WALL_CLOCK_TRAVEL_OFFSET_S")
if _offset:
    try:
        import time

        import time_machine
    except ImportError:  # another interpreter without the test extra: say so rather than run at the real time silently
        sys.stderr.write("sitecustomize: WALL_CLOCK_TRAVEL_OFFSET_S is set but time-machine is not installed; "
                         "this process runs at the real time\n")
    else:
        time_machine.travel(time.time() + float(_offset), tick=True).start()
