"""Work that runs after the answer: a bounded queue and one thread.

Stages whose every rule the policy only monitors (by default uncertainty and squeeze) cannot change
what a client gets, so the answer does not wait for them: the request hands them its context and
goes on. The queue is bounded (``capacity`` requests); when it is full the work is dropped and
counted (``firewall_deferred_dropped_total``), never queued without bound. The worker thread runs at
a lower scheduling priority (nice + ``NICENESS``, Linux), so when the cores are short the answers
get them first and the monitoring queue fills and sheds. ``close`` finishes what is queued, so
findings are not lost at shutdown.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("firewall.deferred")

_STOP = object()
NICENESS = 10


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

    def join(self) -> None:
        """Wait until every job queued so far has run."""
        self._jobs.join()

    def _work(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux sets a thread's own niceness by its id
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        while (job := self._jobs.get()) is not _STOP:
            try:
                job()
            except Exception:  # one bad request's monitoring must not end everyone's
                log.exception("deferred.failed")
            finally:
                self._jobs.task_done()

    def close(self) -> None:
        self._jobs.put(_STOP)  # blocks while full: the worker is draining it
        self._thread.join()
