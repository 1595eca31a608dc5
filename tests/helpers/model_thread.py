"""Holding the app's model thread (``varlib.app.ModelWorker``) while requests pile up, and reading what is queued,
without depending on how soon the thread runs: every wait is on an event or on the worker's own condition."""

from __future__ import annotations

import threading

from varlib.app import ModelWorker

WAIT_S = 300  # a bound for a stuck test, never a timing the test relies on


def hold_model_thread(worker: ModelWorker) -> threading.Event:
    """Queues a call that keeps the worker's thread busy until the returned event is set, and returns only once the
    thread runs it (so that the call is no longer among the queued jobs)."""
    release, started = threading.Event(), threading.Event()
    worker.call(lambda: (started.set(), release.wait(WAIT_S)))
    assert started.wait(WAIT_S), "the model thread never started the holding call"
    return release


def wait_for_queued(worker: ModelWorker, count: int) -> list:
    """Waits, under the worker's lock, until ``count`` jobs are queued; returns their labels in arrival order."""
    with worker._condition:
        assert worker._condition.wait_for(lambda: len(worker._pending) >= count, WAIT_S), (
            f"{count} jobs were never queued (queued: {len(worker._pending)})")
        return [job.labels for job in worker._pending]
