"""What an executor is: it takes the sweep's tasks and returns one `TaskResult` each, reporting as runs go.

An executor is one file in this package that registers its class (`@EXECUTORS.register("name")`) and names the
sweep options it reads (`options`); `--executor NAME` picks it, and an option of another executor is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from mugcp_bench.runs.options import resolve_device

if TYPE_CHECKING:
    from mugcp_bench.runs.job import RunTask, TaskResult
    from mugcp_bench.runs.options import RunSettings, SweepOptions
    from mugcp_bench.runs.progress import Reporter


class Executor:
    """Base class. Subclasses set `name` and `options` and implement `from_options` and `run`."""

    name: ClassVar[str] = ""
    # the SweepOptions fields (with their CLI options --gpus, --ray-address, ...) only this executor reads
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_options(cls, options: SweepOptions) -> Executor:
        return cls()

    def device(self, requested: str) -> str:
        """The device the runs will use, given the sweep's `--device`; checks the executor's options."""
        return resolve_device(requested)

    def describe(self) -> str:
        """A few words for the plan line, e.g. '2 workers (cpu, cpu)'."""
        return self.name

    def run(
        self, tasks: Sequence[RunTask], settings: RunSettings, reporter: Reporter, keep_going: bool
    ) -> list[TaskResult]:
        raise NotImplementedError
