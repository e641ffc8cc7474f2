"""Running a sandbox: on its own event-loop thread (:class:`SandboxServer`, for tests and in-process tools) or
until SIGINT/SIGTERM (:func:`serve`, the CLI). The application itself is :class:`~membercare.sandbox.app.SandboxApp`.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from membercare.sandbox.app import SandboxApp
from membercare.sandbox.config import SandboxConfig
from membercare.sandbox.endpoints import TOKEN_PATH
from membercare.sandbox.recipients import EngagementModel, EventClock


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (roughly twice the request rate), else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def start_site(sandbox: SandboxApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``sandbox`` on ``host:port`` (0: a free port); the runner (to clean up) and the bound port."""
    runner = web.AppRunner(sandbox.build(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    addresses = runner.addresses  # (host, port, ...) of each listening socket
    return runner, int(addresses[0][1]) if addresses else port


class SandboxServer:
    """A sandbox on its own event-loop thread, for tests and in-process tools.

    ::

        with SandboxServer(SandboxConfig(seed=7)) as sandbox:
            env = {"MEMBERCARE_SENDGRID_BASE_URL": sandbox.url, ...}
            ...
            assert sandbox.stats()["accepted"]["email"] == 1

    The helper methods run on the server's loop (thread-safe); the same data is served over HTTP at
    ``/sandbox/*`` for out-of-process users.
    """

    def __init__(self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 model: EngagementModel | None = None, clock: EventClock | None = None):
        self.app = SandboxApp(config, model=model, clock=clock)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_uri(self) -> str:
        return self.url + TOKEN_PATH

    def start(self) -> SandboxServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._runner, self.port = loop.run_until_complete(start_site(self.app, self.host, self.port))
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="membercare-sandbox", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result (``fn`` may return an awaitable)."""
        assert self._loop is not None

        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(60)

    def configure(self, **patch: Any) -> SandboxConfig:
        return self.call(lambda: self.app.reconfigure(patch))

    def reset(self, *, config: bool = False) -> None:
        self.call(lambda: self.app.reset(config=config))

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        return self.call(lambda: self.app.messages(channel))

    def stats(self) -> dict[str, Any]:
        return self.call(self.app.stats)

    def captured(self) -> list[dict[str, Any]]:
        return self.call(lambda: list(self.app.state.captured))

    def drain(self, timeout: float = 10.0) -> bool:
        return self.call(lambda: self.app.recipients.drain(timeout))

    def set_event_clock(self, clock: EventClock | None) -> None:
        """When the simulated recipients' events happen from now on (``None``: the wall clock at the moment
        an event is built). ``reset(config=True)`` restores the clock the server was constructed with.

        A test that writes data between two sends uses it to place the later events after that data
        (SendGrid stamps whole seconds) instead of waiting for the wall clock to move on.
        """
        self.call(lambda: setattr(self.app.recipients, "clock", clock))

    @property
    def sendgrid_public_key(self) -> str:
        return self.app.signer.public_key_b64


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve(config: SandboxConfig, host: str, port: int, *, on_ready: Callable[[SandboxApp, int], None]
                | None = None) -> None:
    """Run a sandbox until SIGINT or SIGTERM (or until cancelled), then shut it down cleanly (the CLI).

    On the main thread it installs its own handlers for both signals, whatever the process inherited:
    a non-interactive shell starts background jobs with SIGINT ignored (so Ctrl-C or ``kill -INT``
    would do nothing), and SIGTERM's default action would end the process without the cleanup.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        sandbox = SandboxApp(config)
        runner, bound = await start_site(sandbox, host, port)
        if on_ready:
            on_ready(sandbox, bound)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
