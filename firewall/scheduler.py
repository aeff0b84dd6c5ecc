"""Worker threads that take queued work by priority instead of in arrival order.

Admission bounds how much work may wait (firewall/throttle.py); this decides which waiting request
a free worker takes next: the one with the lowest priority key, ties in arrival order. The request
path gives established clients (ids seen before) precedence over ids first seen in this request,
and among them the client with the fewest requests in flight, so a flood of fresh ids or one
greedy id queues behind a normal client instead of in front of it (weighted fair queueing in
spirit: Demers, Keshav & Shenker, SIGCOMM 1989, with a share per client).

Each submission returns its own ``Future``; cancelling one that no worker has taken yet drops it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class PriorityExecutor:
    def __init__(self, workers: int, thread_name_prefix: str):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix)
        self.waiting: list[tuple[tuple[int, ...], int, Future, Callable[..., Any], tuple[Any, ...]]] = []
        self.order = itertools.count()
        self.lock = threading.Lock()

    def submit(self, priority: tuple[int, ...], fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self.lock:
            heapq.heappush(self.waiting, (priority, next(self.order), future, fn, args))
        self.pool.submit(self._run_next)  # one pool task per submission: each runs the best waiting item
        return future

    def _run_next(self) -> None:
        while True:
            with self.lock:
                if not self.waiting:
                    return  # an earlier task skipped a cancelled item and ran this one's
                _, _, future, fn, args = heapq.heappop(self.waiting)
            if future.set_running_or_notify_cancel():
                break
        try:
            result = fn(*args)
        except Exception as error:  # handed to whoever awaits the future
            future.set_exception(error)
        else:
            future.set_result(result)

    def shutdown(self) -> None:
        """Cancel what waits, let what runs finish."""
        with self.lock:
            waiting, self.waiting = self.waiting, []
        for _, _, future, _, _ in waiting:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
