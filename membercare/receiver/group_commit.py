"""Group commit: the events of concurrent webhook requests stored in one transaction.

Twilio posts one status callback per request and message status, so an SMS campaign of 300,000 messages
brings about 900,000 requests. One transaction per request cost ~1.3 ms per event on SQLite, one
transaction for 32 events ~0.08 ms per event (measured with ``ingest_events`` on a file database): the
commit, not the insert, is the price. :class:`GroupCommit` therefore queues the events of requests that
arrive while a transaction is running and stores all of them in the next one.

* Nothing is answered before its events are committed: each request awaits the transaction that holds
  its events, so the receiver's guarantee (2xx only after commit) is unchanged.
* No added latency when idle: the first request's transaction starts at once; only requests that
  arrive while one is running wait for the next.
* One bad request cannot fail the others: if a combined transaction fails, every request's events are
  retried in a transaction of their own, and only the failing request sees the error (a 500, which makes
  the provider retry). Stored events are deduplicated by their provider key, so the retries are safe.

Runs on the server's event loop (one per process); database work goes to the threadpool as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from membercare.engagement.events import EngagementEvent
from membercare.engagement.store import IngestResult, ingest_events

log = logging.getLogger("membercare.receiver")


class GroupCommit:
    """Stores events through :func:`ingest_events`, several requests per transaction when they overlap.

    ``max_events`` bounds one transaction (a single request larger than that still goes alone).
    ``transactions`` and ``requests`` count what was done, for logs and tests.
    """

    def __init__(self, engine: Engine, *, max_events: int = 1000):
        if max_events < 1:
            raise ValueError("max_events must be positive")
        self.engine, self.max_events = engine, max_events
        self._queue: deque[tuple[Sequence[EngagementEvent], asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None
        self.transactions = 0
        self.requests = 0

    async def store(self, events: Sequence[EngagementEvent]) -> IngestResult:
        """Commit ``events`` (with their effects); the result is that of the transaction that held them."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((events, fut))
        self.requests += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    def _take(self) -> list[tuple[Sequence[EngagementEvent], asyncio.Future]]:
        batch: list[tuple[Sequence[EngagementEvent], asyncio.Future]] = []
        n = 0
        while self._queue and (not batch or n + len(self._queue[0][0]) <= self.max_events):
            item = self._queue.popleft()
            batch.append(item)
            n += len(item[0])
        return batch

    async def _commit(self, events: Sequence[EngagementEvent]) -> IngestResult:
        result = await run_in_threadpool(ingest_events, self.engine, list(events))
        self.transactions += 1
        return result

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                try:
                    result = await self._commit([e for events, _ in batch for e in events])
                except Exception as exc:  # noqa: BLE001 - retried per request below, each failure reported there
                    if len(batch) == 1:
                        _settle(batch[0][1], exc=exc)
                        continue
                    log.warning("a combined transaction of %d requests failed (%s); storing them one by one",
                                len(batch), type(exc).__name__)
                    for events, fut in batch:
                        try:
                            _settle(fut, result=await self._commit(events))
                        except Exception as one:  # noqa: BLE001 - this request's own error, answered as such
                            _settle(fut, exc=one)
                    continue
                log.info("%d requests in one transaction: %d events, %d new, %d duplicates", len(batch),
                         result.received, result.stored, result.duplicates)
                for _, fut in batch:
                    _settle(fut, result=result)
            except BaseException as exc:  # cancelled (server shutdown): nobody may wait forever
                for _, fut in batch:
                    _settle(fut, exc=exc)
                raise


def _settle(fut: asyncio.Future, *, result: IngestResult | None = None, exc: BaseException | None = None) -> None:
    # A request whose client went away was cancelled; its events are committed anyway (a retry is a duplicate).
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
