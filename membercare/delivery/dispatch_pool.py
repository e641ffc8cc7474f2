"""The dispatcher's worker threads: a fixed pool (bounded concurrency) that runs each job's provider call.

The main thread keeps the pool fed by claiming the next batch when the in-flight count falls to half a
batch (see :class:`membercare.delivery.dispatcher.Dispatcher`).

Two transports (``DispatchConfig.transport``):

* ``"threads"``: each worker thread passes the gate and then makes the adapter's blocking ``send`` call;
  ``workers`` threads are ``workers`` provider calls in flight.
* ``"async"`` (default): a worker thread takes one of ``workers`` in-flight slots, passes the gate and the
  pacer exactly as above, then hands the HTTP exchange to the process's event loop
  (:func:`membercare.delivery.send_loop.send_loop`) through :meth:`SendPool.handoff` and takes its next
  job at once. The loop runs the adapter's ``send_async`` (the SDK builds the request, aiohttp sends it on
  a keep-alive pool), records the result on the job, frees the slot and puts the job on ``completed``.
  The slot is taken *before* the gate, so a request never waits for a free slot after its gate pass: the
  gate-to-request window stays what it was. Adapters without ``send_async`` (and test doubles) are called
  synchronously in the worker thread, under the same slot.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable

from membercare.delivery.contract import ChannelAdapter, OutboundMessage, SendResult
from membercare.delivery.dispatch_types import Job


class Pending:
    """What :meth:`SendPool.handoff` returns for an exchange that goes on on the event loop."""


PENDING = Pending()

SendAsync = Callable[[OutboundMessage], Awaitable[SendResult]]


class SendPool:
    """``workers`` threads that run ``send(job)`` and put each finished job on ``completed``.

    A minimal replacement for ``ThreadPoolExecutor`` + ``Future`` on the hot path: a ``Future`` allocates a
    ``threading.Condition`` and runs done-callbacks under locks, which profiling showed as about a tenth of
    the dispatching process's CPU at a thousand messages a second. Jobs carry their own result; ``cancel``
    withdraws a job only if no worker has started it (its provider call can then never happen).

    ``asynchronous``: provider calls of adapters with ``send_async`` run on the send loop (see the module
    docstring); ``send`` then returns :data:`PENDING` for them, through :meth:`handoff`.
    """

    def __init__(self, workers: int, send: Callable[[Job], SendResult | Pending | None],
                 completed: queue.SimpleQueue[Job], *, asynchronous: bool = False, threads: int | None = None):
        self._send, self._completed = send, completed
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # In-flight slots as tokens in a C-level queue: blocking on it costs less than threading.Semaphore
        # (a Python Condition with a lock allocated per wait), and every message takes and returns one.
        self._slots: queue.SimpleQueue[None] | None = None
        if asynchronous:
            self._slots = queue.SimpleQueue()
            for _ in range(workers):
                self._slots.put(None)
        self._loop: asyncio.AbstractEventLoop | None = None
        if asynchronous:
            from membercare.delivery.send_loop import send_loop

            self._loop = send_loop()
        self._pending = 0
        self._idle = threading.Condition()  # guards the three below
        self._handoffs: list[tuple[Job, SendAsync]] = []  # handed off, not yet started on the loop
        self._scheduled = False  # the loop has a call to _start pending
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._threads = [threading.Thread(target=self._worker, name=f"mc-dispatch-{i}", daemon=True)
                         for i in range(threads or workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        self._work.put(job)

    def cancel(self, job: Job) -> bool:
        """Withdraw ``job`` if no worker started it yet; True when withdrawn (it is then never sent)."""
        with self._lock:
            if job.started:
                return job.cancelled
            job.cancelled = True
            return True

    def handoff(self, job: Job, adapter: ChannelAdapter) -> SendResult | Pending:
        """Make ``job``'s provider call: on the send loop when the pool is asynchronous and the adapter can
        (returns :data:`PENDING`; the loop completes the job), else right here in the calling thread."""
        assert job.message is not None
        send_async: SendAsync | None = getattr(adapter, "send_async", None)
        loop = self._loop
        if loop is None or send_async is None:
            return adapter.send(job.message)
        with self._idle:
            self._pending += 1
            self._handoffs.append((job, send_async))
            wake, self._scheduled = not self._scheduled, True
        if wake:  # one wake-up of the loop (a write to its self-pipe) per burst of handed-off jobs
            loop.call_soon_threadsafe(self._start)
        return PENDING

    def shutdown(self) -> None:
        """Let the workers finish what they started (queued, non-cancelled jobs still run) and stop; then wait
        for the exchanges still on the send loop (each is bounded by its adapter's timeout)."""
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()
        with self._idle:
            while self._pending:
                self._idle.wait()

    def _worker(self) -> None:
        slots = self._slots
        while True:
            job = self._work.get()
            if job is None:
                return
            if slots is not None:
                slots.get()
            with self._lock:
                if job.cancelled:
                    if slots is not None:
                        slots.put(None)
                    continue
                job.started = True
            result: SendResult | Pending | None = None
            try:
                result = self._send(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the dispatching thread
                job.error = exc
            if result is PENDING:
                continue  # the send loop completes it (see _exchange)
            job.result = result
            if slots is not None:
                slots.put(None)
            self._completed.put(job)

    # -- on the send loop -------------------------------------------------------------------------------

    def _start(self) -> None:
        assert self._loop is not None
        with self._idle:
            handoffs, self._handoffs, self._scheduled = self._handoffs, [], False
        for job, send_async in handoffs:
            task = self._loop.create_task(self._exchange(job, send_async))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _exchange(self, job: Job, send_async: SendAsync) -> None:
        assert job.message is not None
        try:
            job.result = await send_async(job.message)
        except BaseException as exc:  # noqa: BLE001 - handed to the dispatching thread, as from a worker
            job.error = exc
        assert self._slots is not None
        self._slots.put(None)
        self._completed.put(job)
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()


def drain(completed: queue.SimpleQueue[Job], timeout: float) -> list[Job]:
    """Wait up to ``timeout`` for one finished job, then take every other one already there."""
    try:
        done = [completed.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(completed.get_nowait())
        except queue.Empty:
            return done
