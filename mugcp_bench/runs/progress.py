"""How a sweep tells what it is doing: the `Reporter` callbacks (the CLI's displays subclass it) and the lock that
lets executors call one from several threads."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mugcp_bench.runs.job import TaskResult

log = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    """What a sweep is about to do (given to `Reporter.planned`)."""

    counts: dict[str, int]
    backbone: str
    recipe: str
    device: str
    results_dir: Path
    labels: list[str]
    executor: str = "local"


class Reporter:
    """Progress callbacks of a sweep; the default logs. The CLI's draw a progress display on a terminal, or plain
    lines into a log file (`mugcp_bench/commands/progress.py`)."""

    def planned(self, plan: SweepPlan) -> None:
        c = plan.counts
        log.info(
            "%d runs: %d done, %d to train, %d to resume, %d to evaluate",
            c["runs"],
            c.get("skip", 0),
            c.get("train", 0),
            c.get("resume", 0),
            c.get("evaluate", 0),
        )

    def start(self, total: int) -> None:
        """Execution begins with `total` runs to do."""

    def run_started(self, label: str) -> None:
        log.info("run %s", label)

    def step(self, label: str, info: dict[str, Any]) -> None:
        """A training step of run `label` (`StepInfo.as_dict()`: epoch, epochs, step, steps, loss, lr, images_per_s)."""

    def run_finished(self, result: TaskResult) -> None:
        """A run ended: `result.status` complete / failed / interrupted, or running (claimed by another process),
        with its reason, accuracies and time."""
        if result.failed:
            log.error("run failed: %s: %s", result.label, result.reason)

    def close(self) -> None:
        """Execution ended (normally or not)."""


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
            self._reporter.run_finished(result)


__all__ = ["Reporter", "SafeReporter", "SweepPlan"]
