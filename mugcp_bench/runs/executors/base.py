"""What an executor is: it takes the sweep's tasks and returns one `TaskResult` each, reporting as runs go."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mugcp_bench.runs.executors.work import RunTask, TaskResult, WorkContext

if TYPE_CHECKING:
    from mugcp_bench.runs.sweep import Reporter


class Executor:
    """Base class. Subclasses set `name` and implement `run`."""

    name = ""

    def device(self, requested: str) -> str:
        """The device the runs will use, given the sweep's `--device`; checks the executor's options."""
        from mugcp_bench.runs.sweep import resolve_device

        return resolve_device(requested)

    def describe(self) -> str:
        """A few words for the plan line, e.g. '2 workers (cpu, cpu)'."""
        return self.name

    def run(self, tasks: Sequence[RunTask], ctx: WorkContext, reporter: Reporter, keep_going: bool) -> list[TaskResult]:
        raise NotImplementedError


class SafeReporter:
    """Serialises a reporter's callbacks: executors call it from several threads."""

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self._lock = threading.Lock()

    def run_started(self, label: str) -> None:
        with self._lock:
            self._reporter.run_started(label)

    def step(self, label: str, info: dict) -> None:
        with self._lock:
            self._reporter.step(label, info)

    def run_finished(self, result: TaskResult) -> None:
        with self._lock:
            self._reporter.run_finished(result.label, result.status, result.reason)
