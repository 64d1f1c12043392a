"""How `run`, `ablate` and `demo` show a sweep on stderr: a live display on a terminal, plain lines otherwise
(a log file under nohup, Slurm or CI: a line per finished run and, while a run trains, one at most every 30 s).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mugcp_bench.runs.progress import Reporter, SweepPlan

if TYPE_CHECKING:
    from mugcp_bench.runs.job import TaskResult

LINE_INTERVAL_S = 30.0  # off a terminal: at most one training line per run this often
QUIET = False  # -q: no progress display (set by the command line)


def plan_line(plan: SweepPlan) -> str:
    c = plan.counts
    n = c["runs"]
    parts = [f"{c.get('skip', 0)} done", f"{c.get('train', 0)} to train", f"{c.get('resume', 0)} to resume"]
    parts.append(f"{c.get('evaluate', 0)} to evaluate")
    if c.get("claimed"):
        parts.append(f"{c['claimed']} claimed by another process")
    return (
        f"{n} run{'s' if n != 1 else ''}: {', '.join(parts)} ({plan.backbone}, recipe {plan.recipe}, {plan.device}, "
        f"{plan.executor}, results in {plan.results_dir})"
    )


def step_text(s: dict[str, Any]) -> str:
    return (
        f"epoch {s['epoch'] + 1}/{s['epochs']} step {s['step'] + 1}/{s['steps']} loss {s['loss']:.3f} "
        f"lr {s['lr']:.2g} {s['images_per_s']:.0f} img/s"
    )


def result_text(result: TaskResult) -> str:
    """'complete coop toy_shapes base 16-shot seed 1: toy_shapes base 71.20, toy_shapes novel 65.30 (4.2 s)'."""
    text = f"{result.status} {result.label}"
    if result.accuracies:
        text += ": " + ", ".join(f"{k} {v:.2f}" for k, v in result.accuracies.items())
    if result.reason:
        text += f": {result.reason}"
    return text + (f" ({result.seconds:.1f} s)" if result.seconds else "")


class ConsoleReporter(Reporter):
    """The plan line and a progress bar of the runs: done / running / failed across all workers, a row per training
    run (one under the local executor, one per worker under gpus)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.running: set[str] = set()
        self.rows: dict[str, Any] = {}  # label -> progress row of a running run
        self.failed = 0
        self.claimed = 0
        self.stopped = False

    def _counts(self) -> str:
        parts = [f"{len(self.running)} running"] if not self.stopped else ["stopping"]
        if self.failed:
            parts.append(f"[red]{self.failed} failed[/]")
        if self.claimed:
            parts.append(f"{self.claimed} claimed elsewhere")
        return ", ".join(parts)

    def planned(self, plan: SweepPlan) -> None:
        self.console.print(escape(plan_line(plan)), highlight=False)

    def start(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("runs", total=total, status="", counts=self._counts())

    def run_started(self, label: str) -> None:
        self.running.add(label)
        self.progress.update(self.task, counts=self._counts())

    def step(self, label: str, s: dict[str, Any]) -> None:
        if label not in self.running:  # a worker's last step report arriving after its run ended
            return
        row = self.rows.get(label)
        if row is None:
            row = self.rows[label] = self.progress.add_task(label, total=None, status="", counts="")
        self.progress.update(
            row, total=s["epochs"] * s["steps"], completed=s["epoch"] * s["steps"] + s["step"] + 1, status=step_text(s)
        )

    def run_finished(self, result: TaskResult) -> None:
        row = self.rows.pop(result.label, None)
        if row is not None:
            self.progress.remove_task(row)
        self.running.discard(result.label)
        self.failed += result.failed
        self.claimed += result.status == "running"
        self.stopped |= result.status in ("interrupted", "not started")
        self.progress.update(self.task, advance=1, counts=self._counts())
        if result.failed:
            self.progress.console.print(f"[red]failed[/] {escape(result.label)}: {escape(result.reason or '')}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class LineReporter(Reporter):
    """Plain lines for a log file: the plan, one line per finished run (status, label, accuracies, time) and, while a
    run trains, its epoch and step at most every `interval` seconds."""

    def __init__(self, console: Console, interval: float = LINE_INTERVAL_S, clock=time.monotonic) -> None:
        self.console = console
        self.interval = interval
        self.clock = clock
        self.total = 0
        self.done = 0
        self.last: dict[str, float] = {}

    def _line(self, text: str) -> None:
        self.console.print(escape(text), highlight=False, soft_wrap=True)

    def planned(self, plan: SweepPlan) -> None:
        self._line(plan_line(plan))

    def start(self, total: int) -> None:
        self.total = total

    def run_started(self, label: str) -> None:
        self.last[label] = self.clock()

    def step(self, label: str, s: dict[str, Any]) -> None:
        now = self.clock()
        if now - self.last.get(label, now) >= self.interval:
            self.last[label] = now
            self._line(f"[{self.done}/{self.total}] training {label}: {step_text(s)}")

    def run_finished(self, result: TaskResult) -> None:
        self.last.pop(result.label, None)
        self.done += 1
        self._line(f"[{self.done}/{self.total}] {result_text(result)}")


def make_reporter(console: Console) -> Reporter:
    """The live display on a terminal, plain lines otherwise; none under -q (the summary still prints)."""
    if QUIET:
        return Reporter()
    return ConsoleReporter(console) if console.is_terminal else LineReporter(console)


__all__ = ["ConsoleReporter", "LineReporter", "make_reporter", "plan_line", "result_text"]
