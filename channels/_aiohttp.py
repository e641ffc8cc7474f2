"""The adapters' asynchronous transport: SDK-built requests sent with aiohttp on the dispatcher's event loop.

Each adapter's ``send_async`` keeps what its SDK *builds* (SendGrid's Mail JSON and headers, Twilio's
form parameters and Basic auth through the SDK's own ``create_async``, firebase-admin's message encoding
and headers) and sends the bytes through :class:`AioTransport`: one aiohttp session per adapter and event
loop, HTTP/1.1 keep-alive, at most ``pool_size`` connections (the per-provider bound on requests in
flight), no retries (the delivery engine retries), no redirects, one timeout for connecting and one for
each read. Proxies (``HTTP(S)_PROXY``/``NO_PROXY``) and the CA bundle (``REQUESTS_CA_BUNDLE``/
``CURL_CA_BUNDLE``, else certifi's) are read once, as :class:`channels.base.KeepAliveTransport` does.

Why: measured against the sandbox, the blocking transports and the threads they need cost more CPU per
message than building the request; aiohttp on one loop keeps the same number of requests in flight for a
fraction of it (docs/performance.md).

Transport errors map to :class:`TransientFailure` with the same ambiguity rules as the blocking
transports (:func:`aiohttp_failure`): nothing written yet (refused, DNS, TLS, connect timeout) is not
ambiguous; a read timeout or a connection lost once the request was written (the server closed it, a reset,
a torn answer) is ambiguous: the provider may have accepted the message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from membercare.delivery.contract import TransientFailure

if TYPE_CHECKING:
    import aiohttp


class AioTransport:
    """A keep-alive aiohttp session per event loop, created on first use on the loop that sends."""

    def __init__(self, base_url: str, *, pool_size: int, timeout_s: float):
        import os
        from urllib.parse import urlsplit

        from requests.utils import get_environ_proxies

        self.base_url, self.pool_size, self.timeout_s = base_url, pool_size, timeout_s
        scheme = urlsplit(base_url).scheme
        proxies = get_environ_proxies(base_url)
        self.proxy: str | None = proxies.get(scheme) or proxies.get("all")
        self._ca: str | None = None
        if scheme == "https":
            import certifi

            self._ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session of the running loop (one adapter serves one dispatcher loop; a new loop gets a new one)."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and self._loop is loop and not session.closed:
            return session
        import aiohttp

        ssl: Any = True
        if self._ca is not None:
            import ssl as ssl_module

            ssl = ssl_module.create_default_context(cafile=self._ca)
        connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=0, ssl=ssl, keepalive_timeout=30.0)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=self.timeout_s)
        # aiohttp's own User-Agent only where the SDK set none; cookies are never kept between messages.
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                              cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True)
        self._loop = loop
        return self._session

    async def request(self, method: str, url: str, *, body: bytes | None,
                      headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request; (status, headers, body). Raises aiohttp/asyncio exceptions on transport errors."""
        async with self.session().request(method, url, data=body, headers=headers, allow_redirects=False,
                                          proxy=self.proxy) as response:
            data = await response.read()
            return response.status, response.headers, data

    def connections_opened(self) -> int:
        """Connections the session's pool holds or lent out (for tests: keep-alive reuses them)."""
        session = self._session
        if session is None or session.connector is None:
            return 0
        connector: Any = session.connector
        return len(connector._acquired) + sum(len(v) for v in connector._conns.values())

    def close(self) -> None:
        """Close the session on its loop (from any thread; a loop that no longer runs takes it along)."""
        session, loop, self._session = self._session, self._loop, None
        if session is None or loop is None or session.closed or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(session.close())
        elif loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - closing is best effort: the process may be ending
                pass


def aiohttp_failure(exc: BaseException) -> TransientFailure:
    """The :class:`TransientFailure` for an aiohttp (or asyncio timeout) exception; ``ambiguous`` when the
    request may have reached the provider. Mirrors :func:`channels.base.urllib3_failure`."""
    import aiohttp

    name = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # connecting (or waiting for a pooled connection)
        return TransientFailure(reason=f"connect timeout: {name}")
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS handshake, proxy: nothing written
        return TransientFailure(reason=f"connection error before sending: {_cause(exc)}")
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return TransientFailure(reason=f"read timeout after sending: {name}", ambiguous=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransientFailure(reason=f"connection lost after sending: {name}", ambiguous=True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransientFailure(reason=f"answer torn after sending: {name}", ambiguous=True)
    if isinstance(exc, (aiohttp.ClientOSError, aiohttp.ClientResponseError, ConnectionError)):
        # A reset or a malformed answer on a connection that carried (part of) the request.
        return TransientFailure(reason=f"connection lost after sending: {_cause(exc)}", ambiguous=True)
    return TransientFailure(reason=f"request error: {name}")


def _cause(exc: BaseException) -> str:
    inner = getattr(exc, "os_error", None) or exc.__cause__
    return type(inner).__name__ if isinstance(inner, BaseException) else type(exc).__name__


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (asyncio.TimeoutError, TimeoutError, OSError)


def transport_errors() -> tuple[type[BaseException], ...]:
    """What :func:`aiohttp_failure` maps: aiohttp's client errors, timeouts and socket errors."""
    import aiohttp

    return (aiohttp.ClientError, *TRANSPORT_ERRORS)
