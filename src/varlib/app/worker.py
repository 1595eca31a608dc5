"""The app's model thread: every model call runs on it, one at a time, and Generate requests with equal settings
that are waiting together are sampled in one ``VAR.generate`` call.

Gradio's queue hands up to ``batch_size`` Generate requests to the app at once; each waits on its future while the
thread samples. While one call runs, the next requests pile up here, so under load a call takes every waiting
request with the first one's settings (classes or prompts may differ) up to ``batch_size`` images, and a request
alone is sampled at once (no waiting window). Requests are never split: one larger than the room left waits for the
next call, and one larger than ``batch_size`` runs alone.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from varlib.data.base import check_int_at_least


@dataclass
class _Job:
    future: Future
    run: Callable[[], Any] | None = None  # a plain call, never merged
    key: Hashable = None  # a generate request: its settings ...
    labels: list = field(default_factory=list)  # ... and its classes (ints) or prompts (str)


class ModelWorker:
    """Runs model calls on one thread, in arrival order, merging generate requests with equal ``key``.

    Args:
        generate: ``generate(labels, key) -> (B,3,H,W) images`` for B = len(labels), classes or prompts;
            ``key`` holds the sampling settings (hashable; equal keys may share a call, whose random stream is
            then shared).
        batch_size: images one ``generate`` call samples at most when it merges requests; 1 = no merging.
    """

    def __init__(self, generate: Callable[[list, Hashable], torch.Tensor], batch_size: int) -> None:
        self.batch_size = check_int_at_least("batch_size", batch_size, 1)
        self._generate = generate
        self._pending: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self.calls = 0  # generate calls so far
        self._thread = threading.Thread(target=self._serve, name="varlib-app-model", daemon=True)
        self._thread.start()

    def generate(self, labels: list, key: Hashable) -> Future:
        """Queues one request; the future's result is its (len(labels),3,H,W) images, or the error raised."""
        if not labels:
            raise ValueError("a generate request needs at least one label, got none")
        return self._submit(_Job(Future(), key=key, labels=list(labels)))

    def call(self, run: Callable[[], Any]) -> Future:
        """Queues ``run()`` (a call of its own, e.g. an edit); the future holds its result or error."""
        return self._submit(_Job(Future(), run=run))

    def close(self) -> None:
        """Stops the thread after the jobs already queued."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()

    def _submit(self, job: _Job) -> Future:
        with self._condition:
            if self._closed:
                raise RuntimeError("the model worker is closed")
            self._pending.append(job)
            self._condition.notify_all()  # the model thread, and anyone else waiting on the queue (tests do)
        return job.future

    def _next_group(self) -> list[_Job] | None:
        """The next job and, for a generate request, the waiting ones with its key that fit beside it."""
        with self._condition:
            while not self._pending and not self._closed:
                self._condition.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            group, images = [first], len(first.labels)
            if first.run is None:
                for job in list(self._pending):
                    if job.run is None and job.key == first.key and images + len(job.labels) <= self.batch_size:
                        self._pending.remove(job)
                        group.append(job)
                        images += len(job.labels)
            return group

    def _serve(self) -> None:
        while (group := self._next_group()) is not None:
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            try:
                if group and group[0].run is not None:
                    group[0].future.set_result(group[0].run())
                elif group:
                    self.calls += 1
                    images = self._generate([label for job in group for label in job.labels], group[0].key)
                    start = 0
                    for job in group:
                        job.future.set_result(images[start:start + len(job.labels)])
                        start += len(job.labels)
            except Exception as error:  # the requests fail, the thread goes on serving
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(error)
