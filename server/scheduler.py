"""The engine's one worker thread and its queue: the serializing point for every model call.

Requests become jobs. The worker takes the oldest job and, for up to `max_wait_s`, gathers queued jobs with the
same batch key (classification; or generation with equal sampling settings) until `max_batch_rows` rows, so
one forward serves rows of many adapters at once. Control jobs (adapter install/evict, merges) run alone, in order.
A batch that fails is retried job by job, so one bad request never fails the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Job:
    batch_key: Hashable | None  # jobs with equal keys may share a forward; None: a control job, runs alone
    rows: int = 0
    payload: Any = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(
        self,
        run_batch: Callable[[list[Job]], list[Any]],
        *,
        max_batch_rows: int = 16,
        max_wait_s: float = 0.002,
    ):
        self._run_batch = run_batch
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        with self._cond:
            return len(self._jobs)

    def submit(self, batch_key: Hashable, rows: int, payload: Any) -> Future:
        return self._enqueue(Job(batch_key, rows, payload))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the worker thread and return its result (control jobs: installs, evictions, merges)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.call_async(fn).result()

    def call_async(self, fn: Callable[[], Any]) -> Future:
        """Queue fn to run alone on the worker thread (a streamed generation, for one)."""
        return self._enqueue(Job(None, 0, fn))

    def _enqueue(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                first = self._jobs.pop(0)
            if first.batch_key is None:
                self._settle([first], lambda jobs: [jobs[0].payload()])
                continue
            self._settle(self._gather(first), self._run_batch)

    def _gather(self, first: Job) -> list[Job]:
        batch, rows = [first], first.rows
        deadline = time.perf_counter() + self.max_wait_s
        with self._cond:
            while rows < self.max_batch_rows:
                i = 0
                while i < len(self._jobs) and rows < self.max_batch_rows:
                    job = self._jobs[i]
                    if job.batch_key == first.batch_key and rows + job.rows <= self.max_batch_rows:
                        batch.append(self._jobs.pop(i))
                        rows += job.rows
                    else:
                        i += 1
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or rows >= self.max_batch_rows:
                    break
                self._cond.wait(timeout=remaining)
        return batch

    def _settle(self, batch: list[Job], run: Callable[[list[Job]], list[Any]]) -> None:
        try:
            results = run(batch)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach its request
            if len(batch) > 1:
                for job in batch:  # find the job that fails; the others still get their answers
                    self._settle([job], run)
                return
            batch[0].future.set_exception(exc)
            return
        for job, result in zip(batch, results):
            job.future.set_result(result)
