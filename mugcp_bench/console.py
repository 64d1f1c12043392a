"""Progress of long steps on stderr: a rich progress bar on a terminal, plain throttled lines everywhere else.

Off a terminal (a log file under nohup, Slurm or CI) a progress bar prints nothing until it finishes, so a long step
looks hung. `Progress` then writes one line when the step starts, one at most every `interval` seconds while it
advances, and one when it ends::

    pretraining toy CLIP: 0/450 steps
    pretraining toy CLIP: 120/450 steps (27%), 2m10s elapsed, ~5m58s left, loss 2.431
    pretraining toy CLIP: 450/450 steps (100%), done in 8m07s, loss 1.302

Use it as a context manager::

    with Progress("rendering toy suite", total=n, unit="images") as bar:
        for ...:
            bar.advance(1)
            bar.update(status="loss 1.20")  # free text shown after the counts (no advance)

No click and no global state: the command layer decides whether to show progress (`enabled`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

LINE_INTERVAL_S = 30.0  # off a terminal: at most one progress line this often


def format_duration(seconds: float) -> str:
    """'45s', '2m10s', '1h02m' (rounded to whole seconds)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def is_terminal(stream: IO[str]) -> bool:
    """Whether `stream` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """One long step: `total` units of work (None: unknown), advanced with `advance(n)`.

    description: what is being done ("pretraining toy CLIP"). unit: what is counted ("steps", "images", "runs").
    stream: where to write (default: sys.stderr at the time the step starts). interval: seconds between plain lines
    (off a terminal). enabled: False shows nothing at all. terminal: force the rich bar (True) or plain lines
    (False) instead of asking the stream. clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        unit: str = "steps",
        stream: IO[str] | None = None,
        interval: float = LINE_INTERVAL_S,
        enabled: bool = True,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.description = description
        self._total = total
        self.unit = unit
        self.completed = 0
        self.status = ""
        self.interval = interval
        self.enabled = enabled
        self._stream = stream
        self._terminal = terminal
        self._clock = clock
        self._start: float | None = None
        self._last_line: float | None = None
        self._bar: Any = None  # rich.progress.Progress on a terminal
        self._task: Any = None
        self.lines: int = 0  # plain lines written (for tests and callers that want to know)

    # ------------------------------------------------------------------------------------------------ state

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.update(self._task, total=value)

    @property
    def elapsed(self) -> float:
        """Seconds since the step started (0 before)."""
        return 0.0 if self._start is None else max(0.0, self._clock() - self._start)

    def remaining(self) -> float | None:
        """Estimated seconds left at the average rate so far (None when nothing is done yet or the total is unknown)."""
        if self._total is None or self.completed <= 0 or self._start is None:
            return None
        left = max(self._total - self.completed, 0)
        return self.elapsed / self.completed * left

    def counts(self) -> str:
        """'120/450 steps (27%)', or '120 steps' with an unknown total."""
        if self._total is None:
            return f"{self.completed} {self.unit}"
        pct = f" ({100 * self.completed / self._total:.0f}%)" if self._total > 0 else ""
        return f"{self.completed}/{self._total} {self.unit}{pct}"

    # ------------------------------------------------------------------------------------------------ life

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    def start(self) -> None:
        """Start the clock and show the step (the context manager calls this)."""
        self._start = self._clock()
        if not self.enabled:
            return
        stream = self._stream if self._stream is not None else sys.stderr
        self._stream = stream
        terminal = is_terminal(stream) if self._terminal is None else self._terminal
        if terminal:
            self._bar = _rich_bar(stream)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self._total, status=self.status)
        else:
            self._write(f"{self.description}: {self.counts()}" if self._total is not None else self.description)
            self._last_line = self._clock()

    def advance(self, n: int = 1, status: str | None = None) -> None:
        """`n` more units done (and an optional new status text)."""
        self.completed += n
        if status is not None:
            self.status = status
        self._show()

    def update(self, status: str | None = None, completed: int | None = None) -> None:
        """Set the status text and/or the absolute count done."""
        if completed is not None:
            self.completed = completed
        if status is not None:
            self.status = status
        self._show()

    def close(self, failed: bool = False) -> None:
        """End the step: the bar stops, or the final line says how long it took (or where it stopped)."""
        if not self.enabled or self._start is None:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._last_line is not None:
            took = format_duration(self.elapsed)
            where = f"stopped at {self.counts()} after {took}" if failed else f"{self.counts()}, done in {took}"
            self._write(f"{self.description}: {where}{self._status_suffix()}")
            self._last_line = None

    # ------------------------------------------------------------------------------------------------ output

    def line(self) -> str:
        """The plain progress line: '<description>: 120/450 steps (27%), 2m10s elapsed, ~5m58s left[, status]'."""
        parts = [self.counts(), f"{format_duration(self.elapsed)} elapsed"]
        left = self.remaining()
        if left is not None:
            parts.append(f"~{format_duration(left)} left")
        return f"{self.description}: {', '.join(parts)}{self._status_suffix()}"

    def _status_suffix(self) -> str:
        return f", {self.status}" if self.status else ""

    def _show(self) -> None:
        if not self.enabled or self._start is None:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, status=self.status)
            return
        if self._last_line is None:  # closed
            return
        now = self._clock()
        if now - self._last_line >= self.interval:
            self._write(self.line())
            self._last_line = now

    def _write(self, text: str) -> None:
        assert self._stream is not None
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken log stream must not stop the work
            return
        self.lines += 1


def _rich_bar(stream: IO[str]) -> Any:
    """A rich progress bar on `stream` with a free-text `status` field."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=stream),
        transient=False,
    )


__all__ = ["LINE_INTERVAL_S", "Progress", "format_duration", "is_terminal"]
