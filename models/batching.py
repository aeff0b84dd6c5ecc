"""Cross-request micro-batching: the images of concurrent requests in one model call.

Each ONNX Runtime call has a fixed cost (argument checks, thread hand-off, small-kernel set-up)
that a batch of one image pays in full. ``MicroBatcher`` lets concurrent callers share calls: the
first caller leads and runs its batch at once; callers arriving meanwhile queue up, and when the
call ends the oldest of them leads the next call with every queued batch that fits in
``max_rows`` (first come, first served). Nobody waits for company: an idle model runs a lone
request immediately, and under load the batches form by themselves while the previous call runs
(the queue holds at most one batch per waiting thread, so it is bounded by the worker pool).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

Outputs = tuple[np.ndarray, ...]


class _Job:
    __slots__ = ("batch", "done", "error", "lead", "outputs")

    def __init__(self, batch: np.ndarray):
        self.batch = batch
        self.done = threading.Event()
        self.lead = False  # woken to run the next call rather than with a result
        self.outputs: Outputs | None = None
        self.error: BaseException | None = None


class MicroBatcher:
    """Runs ``run`` (a batch in, arrays with one row per input row out) on concurrent callers' batches together."""

    def __init__(self, run: Callable[[np.ndarray], Outputs], max_rows: int = 256):
        self.run = run
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._busy = False  # a leader is running; not busy implies an empty queue

    def __call__(self, batch: np.ndarray) -> Outputs:
        job = _Job(batch)
        with self._lock:
            self._queue.append(job)
            lead, self._busy = not self._busy, True
        if not lead:
            job.done.wait()
            if not job.lead:
                return self._result(job)
        self._lead()
        return self._result(job)

    def _lead(self) -> None:
        with self._lock:
            jobs, rows = [], 0
            while self._queue and (not jobs or rows + len(self._queue[0].batch) <= self.max_rows):
                rows += len(self._queue[0].batch)
                jobs.append(self._queue.pop(0))
        try:
            outputs = self.run(jobs[0].batch if len(jobs) == 1 else np.concatenate([job.batch for job in jobs]))
            start = 0
            for job in jobs:
                end = start + len(job.batch)
                job.outputs = tuple(output[start:end] for output in outputs)
                start = end
        except BaseException as error:  # every caller of this call gets the error, none waits forever
            for job in jobs:
                job.error = error
        with self._lock:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].done.set()
            else:
                self._busy = False
        for job in jobs[1:]:
            job.done.set()

    @staticmethod
    def _result(job: _Job) -> Outputs:
        if job.error is not None:
            raise job.error
        assert job.outputs is not None
        return job.outputs
