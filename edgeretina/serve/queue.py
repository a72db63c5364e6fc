"""A bounded queue with micro-batching in front of one grader.

Requests put a job in (``submit``: a concurrent.futures.Future back, or QueueFull when ``capacity`` jobs are
already waiting); ``workers`` threads take jobs out and hand each batch to ``process``, one call per batch.
A worker that takes a job waits up to ``batch_wait_s`` for more to arrive, until it holds ``max_batch``:
requests that arrive together share one forward pass, and an idle service adds at most ``batch_wait_s`` to a
lone request. ``max_batch=1`` turns batching off (no waiting), which is what a batching benchmark compares.

Capacity counts waiting jobs only, not the ones being graded: with capacity Q and W workers at most Q + W *
max_batch requests are admitted at once, and the (Q+1)-th waiting one is refused at once with an estimate of
when to retry, instead of waiting out its timeout.

A job whose request gave up (timeout) is cancelled: taken out if it still waits, its result dropped if it is
already being graded. The queue knows nothing about images: ``process`` is any function of a list of
payloads that returns one result per payload, in order (an exception fails every job of the batch).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from edgeretina.errors import ServeError

P = TypeVar("P")
R = TypeVar("R")

_EMA_WEIGHT = 0.2          # how fast the per-job time estimate (Retry-After) follows the recent batches


class QueueFull(ServeError):
    """The queue holds `capacity` waiting jobs; `retry_after_s` is when a slot is likely to be free."""

    def __init__(self, capacity: int, retry_after_s: int):
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        super().__init__(f"the grading queue is full ({capacity} waiting); retry in about {retry_after_s} s")


class QueueClosed(ServeError):
    """The service is shutting down: the job was not (and will not be) graded."""


@dataclass
class _Job(Generic[P]):
    payload: P
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class BatchingQueue(Generic[P, R]):
    def __init__(self, process: Callable[[list[P]], Sequence[R]], *, capacity: int, workers: int = 1,
                 max_batch: int = 1, batch_wait_s: float = 0.0,
                 on_batch: Callable[[int, float, float], None] | None = None):
        """on_batch(size, seconds graded, seconds the oldest job waited): called after every batch."""
        self.process = process
        self.capacity = capacity
        self.workers = workers
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self._jobs: deque[_Job[P]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._seconds_per_job: float | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker (not those being graded)."""
        with self._cond:
            return len(self._jobs)

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"edgeretina-grade-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, payload: P) -> Future:
        """Queue one job; its future gets `process`'s result for it. Raises QueueFull or QueueClosed."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the grading service is shutting down")
            if len(self._jobs) >= self.capacity:
                raise QueueFull(self.capacity, self._retry_after(len(self._jobs)))
            job = _Job(payload)
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, future: Future) -> bool:
        """Give up a job: True when it had not started (it is taken out and will never be graded)."""
        with self._cond:
            if not future.cancel():
                return False
            for job in self._jobs:
                if job.future is future:
                    self._jobs.remove(job)
                    break
            return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones with QueueClosed, let the batches being graded finish."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(QueueClosed("the grading service shut down before this image was graded"))
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            waited = time.monotonic() - batch[0].enqueued
            started = time.monotonic()
            try:
                results = list(self.process([job.payload for job in batch]))
                if len(results) != len(batch):
                    raise ServeError(f"the grader returned {len(results)} results for {len(batch)} jobs")
            except BaseException as exc:   # the batch fails, the worker goes on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            seconds = time.monotonic() - started
            for job, result in zip(batch, results):
                job.future.set_result(result)
            self._learn(seconds / len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds, waited)

    def _take(self) -> list[_Job[P]] | None:
        """The next batch: block for a first job, then gather more for up to batch_wait_s. None: closed."""
        with self._cond:
            first = self._next_live(block=True)
            if first is None:
                return None
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch and not self._closed:
                job = self._next_live(block=False)
                if job is not None:
                    batch.append(job)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _next_live(self, block: bool) -> _Job[P] | None:
        """Pop the oldest job that was not cancelled and mark it running (holding the lock)."""
        while True:
            while not self._jobs:
                if self._closed or not block:
                    return None
                self._cond.wait()
            job = self._jobs.popleft()
            if job.future.set_running_or_notify_cancel():
                return job

    def _learn(self, seconds_per_job: float) -> None:
        with self._cond:
            previous = self._seconds_per_job
            self._seconds_per_job = seconds_per_job if previous is None else \
                previous + _EMA_WEIGHT * (seconds_per_job - previous)

    def _retry_after(self, waiting: int) -> int:
        """Whole seconds until the jobs ahead are likely graded (at least 1, as Retry-After counts)."""
        per_job = self._seconds_per_job or 1.0
        return max(1, math.ceil(per_job * waiting / self.workers))
