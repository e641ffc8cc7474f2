"""The dispatcher process's event loop for provider calls: one loop, in one daemon thread, per process.

Adapters that offer ``async def send_async(message)`` (the official SDKs build the request, aiohttp sends
it) run their exchanges here, so a dispatcher keeps its provider calls in flight without a blocked thread
per call. Each adapter opens its own keep-alive connection pool on this loop the first time it sends.

uvloop is used when it is installed (it is a dependency where the platform has it): measured against the
sandbox it cut the event loop's share of an aiohttp exchange by about a third.
"""

from __future__ import annotations

import asyncio
import os
import threading

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = 0


def send_loop() -> asyncio.AbstractEventLoop:
    """This process's running send loop (started on first use; it lives as long as the process)."""
    global _loop, _pid
    with _lock:
        if _loop is not None and _pid == os.getpid() and not _loop.is_closed():
            return _loop
        loop = _new_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=run, name="mc-send-loop", daemon=True).start()
        ready.wait()
        _loop, _pid = loop, os.getpid()
        return loop


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
