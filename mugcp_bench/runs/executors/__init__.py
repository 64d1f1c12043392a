"""Executors: how a sweep's planned runs are spread out. `local` (this process), `gpus` (a worker process per
device) and `ray` (a Ray task per run). All of them run `executors.work.perform` on each run, which takes the run's
claim first (`mugcp_bench.store.claims`), so two sweeps on one results directory never train the same run twice."""

from __future__ import annotations

from mugcp_bench.errors import UserError
from mugcp_bench.registry import suggest
from mugcp_bench.runs.executors.base import Executor

EXECUTORS = ("local", "gpus", "ray")


def build_executor(
    name: str = "local",
    gpus: str | None = None,
    ray_address: str | None = None,
    ray_gpus_per_run: float | None = None,
    ray_cpus_per_run: float = 1.0,
) -> Executor:
    """The executor named by `--executor`, with its options (options of another executor are an error)."""
    key = (name or "local").strip().lower()
    if key not in EXECUTORS:
        raise UserError(f"unknown executor '{name}'.{suggest(key, list(EXECUTORS))} Executors: {', '.join(EXECUTORS)}")
    if gpus is not None and key != "gpus":
        raise UserError(f"--gpus is an option of --executor gpus (not {key}); add --executor gpus")
    ray_opts = ray_address is not None or ray_gpus_per_run is not None or ray_cpus_per_run != 1.0
    if ray_opts and key != "ray":
        raise UserError(f"--ray-* options need --executor ray (not {key})")
    if key == "gpus":
        from mugcp_bench.runs.executors.gpus import GpuWorkersExecutor

        return GpuWorkersExecutor(gpus)
    if key == "ray":
        from mugcp_bench.runs.executors.ray_cluster import RayExecutor

        return RayExecutor(ray_address, ray_gpus_per_run, ray_cpus_per_run)
    from mugcp_bench.runs.executors.local import LocalExecutor

    return LocalExecutor()


__all__ = ["EXECUTORS", "Executor", "build_executor"]
