"""Where per-batch work runs: in this process, in a local process pool, or as Ray tasks.

All three give the same `imap(fn, items)`: results in input order, with at most `window` batches in
flight, so memory stays bounded however long `items` is. `fn` must be a module-level function (it is
pickled to the workers) and should keep expensive per-process state in a module-level cache.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from llmkernel.errors import optional_import


def default_workers(workers: int) -> int:
    """`workers` if set, else one per CPU core this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class InlineExecutor:
    """Runs every batch in this process (one worker: no pickling, plain tracebacks)."""

    workers = 1

    def imap(
        self, fn: Callable[..., Any], items: Iterable[Any], *args: Any, window: int = 0
    ) -> Iterator[Any]:
        for item in items:
            yield fn(item, *args)

    def close(self) -> None:
        pass


class LocalExecutor:
    """A pool of worker processes on this machine (started with 'spawn': safe after threads exist)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def imap(
        self, fn: Callable[..., Any], items: Iterable[Any], *args: Any, window: int = 0
    ) -> Iterator[Any]:
        window = window or 2 * self.workers
        pending: deque[Future] = deque()
        for item in items:
            pending.append(self._pool.submit(fn, item, *args))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class RayExecutor:
    """Ray tasks on a local Ray instance or on the cluster at `address`."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        self._ray = optional_import("ray", extra="ray")
        self._started_here = not self._ray.is_initialized()
        if self._started_here:
            init_args: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
            self._ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False, **init_args)
        self.workers = int(self._ray.cluster_resources().get("CPU", workers))
        self._remote: dict[Callable[..., Any], Any] = {}

    def imap(
        self, fn: Callable[..., Any], items: Iterable[Any], *args: Any, window: int = 0
    ) -> Iterator[Any]:
        window = window or 2 * self.workers
        remote = self._remote.setdefault(fn, self._ray.remote(fn))
        shared_args = [self._ray.put(a) for a in args]
        pending: deque[Any] = deque()
        for item in items:
            pending.append(remote.remote(item, *shared_args))
            if len(pending) >= window:
                yield self._ray.get(pending.popleft())
        while pending:
            yield self._ray.get(pending.popleft())

    def close(self) -> None:
        if self._started_here:
            self._ray.shutdown()


def make_executor(
    kind: str, workers: int, ray_address: str | None = None
) -> InlineExecutor | LocalExecutor | RayExecutor:
    """The executor named by a stage config's `executor` field."""
    workers = default_workers(workers)
    if kind == "ray":
        return RayExecutor(workers, ray_address)
    if workers == 1:
        return InlineExecutor()
    return LocalExecutor(workers)
