"""Work that runs after the answer: a bounded queue and one thread.

Stages whose every rule the policy only monitors (by default uncertainty and squeeze) cannot change
what a client gets, so the answer does not wait for them: the request hands them its context and
goes on. The queue is bounded (``capacity`` requests); when it is full the work is dropped and
counted (``firewall_deferred_dropped_total``), never queued without bound. ``close`` finishes what
is queued, so findings are not lost at shutdown.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("firewall.deferred")

_STOP = object()


class DeferredQueue:
    def __init__(self, name: str, capacity: int):
        self.capacity = capacity
        self.dropped = 0
        self._count = threading.Lock()
        self._jobs: queue.Queue = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._work, name=f"deferred-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (and counted) when the queue is full."""
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            with self._count:
                self.dropped += 1
            return False
        return True

    def __len__(self) -> int:
        return self._jobs.qsize()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            try:
                job()
            except Exception:  # one bad request's monitoring must not end everyone's
                log.exception("deferred.failed")

    def close(self) -> None:
        self._jobs.put(_STOP)  # blocks while full: the worker is draining it
        self._thread.join()
