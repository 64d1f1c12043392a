"""`--executor gpus [--gpus 0,1,3]`: one worker process per device, each pinned to it with CUDA_VISIBLE_DEVICES.

`--gpus cpu:N` runs N CPU workers instead (CPU-only machines; the tests). Each worker is a one-process pool started
with `spawn`; a thread per worker feeds it runs from one queue. A worker that dies (SIGKILL, out of memory) is
replaced and its run is given again (up to `max_retries` times) with the same claim token, so the new worker takes
the claim back at once and resumes from the run's last epoch checkpoint. A failed run never stops the others.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mugcp_bench.engine.interrupts import StopFile, install_deferred_handler, request_stop, stop_requested
from mugcp_bench.errors import UserError
from mugcp_bench.registry import EXECUTORS
from mugcp_bench.runs.executors.base import Executor
from mugcp_bench.runs.job import (
    RunLabelFilter,
    RunTask,
    TaskResult,
    perform_in_worker,
    record_failure,
    step_reporter,
)
from mugcp_bench.runs.options import RunSettings
from mugcp_bench.runs.progress import SafeReporter

if TYPE_CHECKING:
    from mugcp_bench.runs.options import SweepOptions
    from mugcp_bench.runs.progress import Reporter

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 2


@dataclass(frozen=True)
class Slot:
    """One worker: the device its runs use and the CUDA_VISIBLE_DEVICES it is pinned to (None: CPU)."""

    device: str
    visible: str | None
    threads: int

    @property
    def name(self) -> str:
        return f"gpu {self.visible}" if self.visible is not None else "cpu"


def parse_gpus(spec: str | None) -> list[Slot]:
    """'0,1,3' -> one CUDA worker per index; 'cpu:2' -> two CPU workers; None -> every visible CUDA device."""
    import torch

    text = (spec or "").strip().lower()
    if text.startswith("cpu"):
        count = text[3:].lstrip(":") or "1"
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--gpus {spec}: expected cpu:N with N >= 1, e.g. --gpus cpu:2")
        n = int(count)
        threads = max(1, (os.cpu_count() or 1) // n)
        return [Slot("cpu", None, threads) for _ in range(n)]
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not text:
        if available == 0:
            raise UserError("--executor gpus: no CUDA device is visible; pass --gpus cpu:N for N CPU workers")
        return [Slot("cuda", str(i), 1) for i in range(available)]
    try:
        ids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--gpus {spec}: expected device indices (0,1,3) or cpu:N") from None
    if not ids or len(set(ids)) != len(ids):
        raise UserError(f"--gpus {spec}: expected distinct device indices, e.g. --gpus 0,1,3")
    bad = [i for i in ids if i < 0 or i >= available]
    if bad:
        seen = f"{available} CUDA device(s) visible" if available else "no CUDA device visible"
        raise UserError(f"--gpus {spec}: device {bad[0]} does not exist ({seen}); use --gpus cpu:N without GPUs")
    return [Slot("cuda", str(i), 1) for i in ids]


_worker: dict = {"events": None}


def console_level() -> int:
    """The level this process shows on its console (its handlers'; the root logger may be lower for run logs)."""
    root = logging.getLogger()
    levels = [h.level for h in root.handlers if h.level] or [root.getEffectiveLevel()]
    return min(levels)  # in a worker process: the queue its runs' training steps are reported on


def _init_worker(visible: str | None, threads: int, log_level: int, events=None) -> None:
    """Runs first in every worker, before anything touches CUDA (CUDA reads the variable when it initialises)."""
    _worker["events"] = events
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    handler = logging.StreamHandler()
    handler.setLevel(log_level)
    # as the CLI: library warnings on the root logger (open_clip's "no pretrained weights") are hidden; every line
    # names the run it belongs to (workers' lines interleave)
    handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.ERROR)
    handler.addFilter(RunLabelFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s [run %(run)s] %(name)s: %(message)s"))
    logging.basicConfig(level=log_level, handlers=[handler], force=True)
    install_deferred_handler()  # a terminal's Ctrl-C reaches the workers too: the first one stops after a step
    import torch

    torch.set_num_threads(threads)


def _perform_reporting_steps(task: RunTask, settings: RunSettings) -> TaskResult:
    """`perform_in_worker`, sending (label, step info) to the sweep's process through the worker's queue."""
    events = _worker["events"]
    return perform_in_worker(task, settings, step_reporter(task.label, events.put) if events is not None else None)


@EXECUTORS.register("gpus")
class GpuWorkersExecutor(Executor):
    """One worker process per device (`--gpus 0,1,3`, or `--gpus cpu:N` CPU workers)."""

    name = "gpus"
    options = ("gpus",)

    @classmethod
    def from_options(cls, options: SweepOptions) -> GpuWorkersExecutor:
        return cls(options.gpus)

    def __init__(self, gpus: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        self.spec = gpus
        self.max_retries = max_retries
        self.slots: list[Slot] = []

    def device(self, requested: str) -> str:
        self.slots = parse_gpus(self.spec)
        device = self.slots[0].device
        if requested != "auto" and requested.split(":")[0] != device:
            raise UserError(f"--device {requested} conflicts with --gpus {self.spec or '(all GPUs)'}; drop --device")
        return device

    def describe(self) -> str:
        return f"{len(self.slots)} workers ({', '.join(s.name for s in self.slots)})"

    def run(
        self, tasks: Sequence[RunTask], settings: RunSettings, reporter: Reporter, keep_going: bool
    ) -> list[TaskResult]:
        if not self.slots:
            self.device("auto")
        report = SafeReporter(reporter)
        todo: queue.SimpleQueue[RunTask] = queue.SimpleQueue()
        for t in tasks:
            todo.put(t)
        results: dict[str, TaskResult] = {}
        deaths: dict[str, int] = {}
        lock = threading.Lock()
        stop = threading.Event()
        pools: list[ProcessPoolExecutor] = []
        mp = multiprocessing.get_context("spawn")
        level = console_level()
        events = mp.Queue()  # (label, step info) from the workers' training loops
        draining = threading.Event()

        def drain() -> None:
            while not draining.is_set():
                try:
                    label, info = events.get(timeout=0.2)
                except (queue.Empty, OSError, EOFError, ValueError):
                    continue
                report.step(label, info)

        def new_pool(slot: Slot) -> ProcessPoolExecutor:
            pool = ProcessPoolExecutor(
                1, mp_context=mp, initializer=_init_worker, initargs=(slot.visible, slot.threads, level, events)
            )
            with lock:
                pools.append(pool)
            return pool

        def worker(slot: Slot) -> None:
            pool = new_pool(slot)
            try:
                while not stop.is_set() and not stop_requested():
                    try:
                        task = todo.get_nowait()
                    except queue.Empty:
                        return
                    report.run_started(task.label)
                    try:
                        result = pool.submit(_perform_reporting_steps, task, settings).result()
                    except BrokenProcessPool:
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = new_pool(slot)
                        with lock:
                            deaths[task.id] = deaths.get(task.id, 0) + 1
                            n = deaths[task.id]
                        if n <= self.max_retries:
                            log.warning(
                                "worker on %s died during %s; giving the run again (%d)", slot.name, task.label, n
                            )
                            todo.put(task)
                            continue
                        result = record_failure(task, settings, f"worker died {n} times")
                    except Exception as e:  # noqa: BLE001 - a task that cannot even be sent is that run's failure
                        result = record_failure(task, settings, f"{type(e).__name__}: {e}")
                    with lock:
                        results[task.id] = result
                    report.run_finished(result)  # failed or not, the other runs go on
                    if result.status == "interrupted":  # a Ctrl-C only this worker got: the whole sweep stops
                        request_stop()
            finally:
                pool.shutdown(wait=True)

        stop_file = StopFile(settings.stop_file) if settings.stop_file else None
        threads = [threading.Thread(target=worker, args=(s,), name=f"worker-{i}") for i, s in enumerate(self.slots)]
        drainer = threading.Thread(target=drain, name="worker-progress", daemon=True)
        drainer.start()
        for th in threads:
            th.start()
        try:
            while alive := [th for th in threads if th.is_alive()]:
                alive[0].join(0.2)  # wake up often: the main thread is where Ctrl-C arrives
                if stop_requested() and not stop.is_set():  # first Ctrl-C: every worker stops after its step
                    stop.set()
                    if stop_file is not None:
                        stop_file.signal()
        except BaseException:  # a second Ctrl-C: the workers stop after their step, unfinished runs are left
            stop.set()
            if stop_file is not None:
                stop_file.signal()
            with lock:
                for pool in pools:
                    pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            draining.set()
            drainer.join()
            events.close()
        if stop.is_set():
            raise KeyboardInterrupt  # finished runs are recorded, interrupted ones kept their checkpoint
        return [results[t.id] for t in tasks if t.id in results]


__all__ = ["GpuWorkersExecutor", "Slot", "parse_gpus"]
