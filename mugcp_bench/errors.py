"""User-facing errors: one clear line, exit code 2, raised before any training starts; run failures and interrupts."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input (missing folder, unknown name, bad option). The CLI prints the message and exits with code 2."""

    exit_code = 2


class DiskFull(UserError, OSError):
    """A write found the disk (or the quota) full: one line naming the folder and the space needed (exit 2). Also an
    OSError, so code that tolerates a failed cache write (a warning, no cache) keeps doing so."""


class RunFailed(Exception):
    """A run failed while training or evaluating; recorded in its run.json, exit code 1 for the sweep."""

    exit_code = 1


class NonFiniteLoss(RunFailed):
    """A loss part (or a gradient) became NaN or infinite; training stops at that step (docs/protocol.md §4)."""

    def __init__(self, epoch: int, epochs: int, step: int, steps: int, part: str, value: float) -> None:
        self.epoch, self.epochs, self.step, self.steps, self.part, self.value = epoch, epochs, step, steps, part, value
        super().__init__(
            f"{part} is {value} at epoch {epoch + 1}/{epochs}, step {step + 1}/{steps}: training stopped "
            "(lower the learning rate with --set lr=..., or check the method's loss weights)"
        )

    def details(self) -> dict[str, Any]:
        """What run.json records under `failure` (1-based epoch and step, as the message says)."""
        return {
            "kind": "non_finite",
            "epoch": self.epoch + 1,
            "step": self.step + 1,
            "part": self.part,
            "value": str(self.value),
        }


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the trainer saved a checkpoint at `epoch`/`step`; the CLI exits 130."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}")
