"""`--executor ray [--ray-address auto|HOST:PORT]`: every run is a Ray task (optional extra: mugcp-bench[ray]).

Each task asks for `--ray-gpus-per-run` GPUs (default 1 on CUDA, 0 on the CPU; fractions share a GPU) and
`--ray-cpus-per-run` CPUs. Ray retries a task whose worker died (`max_retries`); the retry carries the task's claim
token, takes the claim back and resumes from the run's last epoch checkpoint. Every node needs mugcp-bench installed
and the results directory, the data root and the cache on a shared file system at the same paths. Without an
address (and no Ray already initialised in this process) a local Ray instance is started and shut down afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mugcp_bench.engine.interrupts import StopFile, request_stop, stop_requested
from mugcp_bench.errors import UserError
from mugcp_bench.registry import EXECUTORS
from mugcp_bench.runs.executors.base import Executor
from mugcp_bench.runs.job import RunTask, TaskResult, perform_in_worker, record_failure, step_reporter
from mugcp_bench.runs.options import RunSettings
from mugcp_bench.runs.progress import SafeReporter

if TYPE_CHECKING:
    from mugcp_bench.runs.options import SweepOptions
    from mugcp_bench.runs.progress import Reporter

log = logging.getLogger(__name__)

INSTALL = "pip install 'mugcp-bench[ray]'"
DEFAULT_MAX_RETRIES = 2


def require_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed; install it with: {INSTALL}") from None
    return ray


def _ray_perform(task: RunTask, settings: RunSettings, threads: int, events=None) -> TaskResult:
    import torch

    torch.set_num_threads(threads)  # the task's CPUs (Ray sets OMP_NUM_THREADS, not torch's own count)
    progress = step_reporter(task.label, events.put_nowait) if events is not None else None
    return perform_in_worker(task, settings, progress)  # training steps go to the sweep through the Ray queue


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    """A Ray task per run, on a local Ray instance or the cluster at `--ray-address`."""

    name = "ray"
    options = ("ray_address", "ray_gpus_per_run", "ray_cpus_per_run")

    @classmethod
    def from_options(cls, options: SweepOptions) -> RayExecutor:
        return cls(options.ray_address, options.ray_gpus_per_run, options.ray_cpus_per_run)

    def __init__(
        self,
        address: str | None = None,
        gpus_per_run: float | None = None,
        cpus_per_run: float = 1.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        if gpus_per_run is not None and gpus_per_run < 0:
            raise UserError(f"--ray-gpus-per-run {gpus_per_run}: must be >= 0 (fractions share a GPU)")
        if cpus_per_run <= 0:
            raise UserError(f"--ray-cpus-per-run {cpus_per_run}: must be positive")
        self.address = address
        self.gpus_per_run = gpus_per_run
        self.cpus_per_run = cpus_per_run
        self.max_retries = max_retries
        self._device = "cpu"

    def device(self, requested: str) -> str:
        from mugcp_bench.runs.options import resolve_device

        require_ray()
        self._device = resolve_device(requested)
        return self._device

    def gpus(self) -> float:
        if self.gpus_per_run is not None:
            return self.gpus_per_run
        return 1.0 if self._device.startswith("cuda") else 0.0

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        return f"Ray tasks on {where} ({self.gpus():g} GPU, {self.cpus_per_run:g} CPU each)"

    def run(
        self, tasks: Sequence[RunTask], settings: RunSettings, reporter: Reporter, keep_going: bool
    ) -> list[TaskResult]:
        ray = require_ray()
        started_here = False
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            started_here = True
        elif self.address:
            log.info("Ray is already initialised in this process; --ray-address %s is not used", self.address)
        threads = max(1, int(self.cpus_per_run))
        remote = ray.remote(_ray_perform).options(
            num_gpus=self.gpus(), num_cpus=self.cpus_per_run, max_retries=self.max_retries, retry_exceptions=False
        )
        report = SafeReporter(reporter)
        pending = {}
        results: dict[str, TaskResult] = {}
        from ray.util.queue import Queue

        events = Queue(actor_options={"num_cpus": 0})  # (label, step info) from the tasks (an actor, no CPU held)

        def drain() -> None:
            n = events.qsize()
            for label, info in events.get_nowait_batch(n) if n else []:
                report.step(label, info)

        try:
            for task in tasks:
                pending[remote.remote(task, settings, threads, events)] = task
                report.run_started(task.label)
            stop_file = StopFile(settings.stop_file) if settings.stop_file else None
            stopping = False
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                drain()
                if stop_requested() and not stopping:  # first Ctrl-C: running tasks stop after their step,
                    stopping = True  # tasks not yet started return at once, untouched
                    if stop_file is not None:
                        stop_file.signal()
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the worker died more than max_retries times, or Ray failed
                        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        result = record_failure(task, settings, reason)
                    results[task.id] = result
                    report.run_finished(result)
                    if result.status == "interrupted":  # a Ctrl-C only that task's process got: the sweep stops
                        request_stop()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            events.shutdown()
            if started_here:
                ray.shutdown()
        if stopping:
            raise KeyboardInterrupt  # finished runs are recorded, interrupted ones kept their checkpoint
        return [results[t.id] for t in tasks if t.id in results]


__all__ = ["INSTALL", "RayExecutor", "require_ray"]
