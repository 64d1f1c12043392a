"""Rendering in worker processes: the renderer is single-threaded Python and numpy on 64 px arrays, so one process
uses one core while the others idle. A `RenderPool` spreads a batch of scenes (pretraining) or the suite's classes
(`write_suite`) over a few spawned processes; renders are pure functions of their scenes, so the bytes do not depend
on the number of workers.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from mugcp_bench.toy.render import Scene, render_batch

T = TypeVar("T")
MAX_WORKERS = 4  # more gains little on 256-image batches (each chunk must be pickled back)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Render processes for this machine: one per core up to MAX_WORKERS, none on a single core."""
    cores = available_cores()
    return 0 if cores < 2 else min(cores, MAX_WORKERS)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: leave when the parent process is gone (killed by a signal, its pool never shut down)
    instead of lingering, holding its log file open."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class RenderPool:
    """`workers` spawned processes (0: render in this process). Use as a context manager."""

    def __init__(self, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> RenderPool:
        if self.workers > 0:
            # spawn: never fork a process whose torch/OpenMP threads are running
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),)
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def render(self, scenes: Sequence[Scene]) -> np.ndarray:
        """`render_batch(scenes)`, split over the workers in contiguous chunks."""
        if self._pool is None or len(scenes) < 2:
            return render_batch(scenes)
        bounds = np.linspace(0, len(scenes), min(self.workers, len(scenes)) + 1).round().astype(int)
        chunks = [list(scenes[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return np.concatenate(list(self._pool.map(render_batch, chunks)))

    def imap(self, fn: Callable[..., T], tasks: Iterable[tuple[Any, ...]]) -> Iterator[T]:
        """fn(*task) for each task, results in task order (in this process without workers)."""
        if self._pool is None:
            for task in tasks:
                yield fn(*task)
            return
        futures = [self._pool.submit(fn, *task) for task in tasks]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()


__all__ = ["RenderPool", "available_cores", "default_workers"]
