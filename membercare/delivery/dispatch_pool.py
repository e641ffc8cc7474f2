"""The dispatcher's worker threads: a fixed pool (bounded concurrency) that runs each job's provider call.

The main thread keeps the pool fed by claiming the next batch when the in-flight count falls to half a
batch (see :class:`membercare.delivery.dispatcher.Dispatcher`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from membercare.delivery.contract import SendResult
from membercare.delivery.dispatch_types import Job


class SendPool:
    """``workers`` threads that run ``send(job)`` and put each finished job on ``completed``.

    A minimal replacement for ``ThreadPoolExecutor`` + ``Future`` on the hot path: a ``Future`` allocates a
    ``threading.Condition`` and runs done-callbacks under locks, which profiling showed as about a tenth of
    the dispatching process's CPU at a thousand messages a second. Jobs carry their own result; ``cancel``
    withdraws a job only if no worker has started it (its provider call can then never happen).
    """

    def __init__(self, workers: int, send: Callable[[Job], SendResult | None], completed: queue.SimpleQueue[Job]):
        self._send, self._completed = send, completed
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, name=f"mc-dispatch-{i}", daemon=True)
                         for i in range(workers)]
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

    def shutdown(self) -> None:
        """Let the workers finish what they started (queued, non-cancelled jobs still run) and stop."""
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()

    def _worker(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            with self._lock:
                if job.cancelled:
                    continue
                job.started = True
            try:
                job.result = self._send(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the dispatching thread
                job.error = exc
            self._completed.put(job)


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
