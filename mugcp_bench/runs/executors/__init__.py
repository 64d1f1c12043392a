"""Executors: how a sweep's planned runs are spread out. `local` (this process), `gpus` (a worker process per
device) and `ray` (a Ray task per run), each one file here registered in `EXECUTORS`. All of them run
`runs.job.perform` on each run, which takes the run's claim first (`mugcp_bench.store.claims`), so two sweeps on one
results directory never train the same run twice."""

from __future__ import annotations

import dataclasses

from mugcp_bench.errors import UserError
from mugcp_bench.registry import EXECUTORS, import_submodules
from mugcp_bench.runs.executors.base import Executor
from mugcp_bench.runs.options import SweepOptions

import_submodules(__name__, __path__)


def build_executor(options: SweepOptions) -> Executor:
    """The executor named by `options.executor`, with its options (an option of another executor is an error)."""
    cls = EXECUTORS.get(options.executor or "local")
    defaults = {f.name: f.default for f in dataclasses.fields(SweepOptions)}
    for _, other in EXECUTORS.items():
        for opt in other.options:
            if other is not cls and getattr(options, opt) != defaults[opt] and opt not in cls.options:
                flag = "--" + opt.replace("_", "-")
                raise UserError(
                    f"{flag} is an option of --executor {other.name} (not {cls.name}); add --executor {other.name}"
                )
    return cls.from_options(options)


__all__ = ["EXECUTORS", "Executor", "build_executor"]
