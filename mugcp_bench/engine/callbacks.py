"""Training callbacks: objects the trainer calls after every step and every epoch.

Pass them to `trainer.fit(callbacks=...)`, or register one for every run of the process with `add_callback` (what a
plugin module named in ``MUGCP_PLUGINS`` does, see `mugcp_bench.plugins`). A callback may raise to stop the run: the
exception ends the run as failed with its message as the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StepInfo:
    """Where training stands after a step (0-based `epoch` and `step`) or an epoch (`step` = steps - 1)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    checkpoint: Path | None  # the run's checkpoint file (after on_epoch_end: written for this epoch)
    lr: float = 0.0  # the epoch's learning rate (first parameter group)
    images_per_s: float = 0.0  # training throughput since the run (or its resume) started

    def as_dict(self) -> dict[str, Any]:
        """The plain values (what a worker process sends to the sweep's progress display)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint"}


class TrainCallback:
    """Base class; override what you need. Every method is a no-op here. The one channel of training events:
    progress displays, a sweep's stop request and claim checks are callbacks too."""

    def on_step_end(self, info: StepInfo) -> None:
        """After the optimizer step (or accumulation) of step `info.step`."""

    def on_epoch_end(self, info: StepInfo) -> None:
        """After the epoch's checkpoint is written."""


_GLOBAL: list[TrainCallback] = []


def add_callback(callback: TrainCallback) -> TrainCallback:
    """Call `callback` in every `fit` of this process (plugins register theirs this way). Returns it."""
    _GLOBAL.append(callback)
    return callback


def remove_callback(callback: TrainCallback) -> None:
    """Undo `add_callback`."""
    _GLOBAL.remove(callback)


def global_callbacks() -> list[TrainCallback]:
    """The callbacks registered with `add_callback`, in registration order."""
    return list(_GLOBAL)


__all__ = ["StepInfo", "TrainCallback", "add_callback", "global_callbacks", "remove_callback"]
