"""`--executor local` (the default): every run in the sweep's own process, one after the other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mugcp_bench.engine.interrupts import stop_requested
from mugcp_bench.registry import EXECUTORS
from mugcp_bench.runs.executors.base import Executor
from mugcp_bench.runs.job import RunTask, TaskResult, perform
from mugcp_bench.runs.options import RunSettings
from mugcp_bench.runs.progress import SafeReporter

if TYPE_CHECKING:
    from mugcp_bench.runs.progress import Reporter


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """Runs in order in this process; without `keep_going` the first failed run stops the sweep (its error)."""

    name = "local"

    def run(
        self, tasks: Sequence[RunTask], settings: RunSettings, reporter: Reporter, keep_going: bool
    ) -> list[TaskResult]:
        report = SafeReporter(reporter)
        results = []
        for task in tasks:
            if stop_requested():  # Ctrl-C during the previous run's evaluation: stop before the next run
                raise KeyboardInterrupt
            report.run_started(task.label)
            result = perform(
                task, settings, progress=lambda s, label=task.label: report.step(label, s), keep_error=True
            )
            results.append(result)
            report.run_finished(result)
            if result.failed and not keep_going and result.error is not None:
                raise result.error
        for r in results:
            r.error = None
        return results
