"""A plugin for fault-injection tests, loaded by the CLI with ``MUGCP_PLUGINS=tests.fault_plugins``.

- method ``faulty``: CoOp plus an extra loss part ``loss_fault`` that is 0 until global step ``fault_step``, then
  ``fault_value`` (``--set fault_value=nan|inf|-inf``), or a NaN gradient (``--set fault_value=grad``);
- ``FAULT_AT=<epoch>:<step>:<action>[:<n>]`` (0-based; step ``end``: after the epoch's checkpoint) registers a
  callback doing <action> the n-th time (default 1) training reaches that point: ``kill``
  (SIGKILL), ``sigint`` (Ctrl-C), ``enospc`` (the next checkpoint write finds the disk full), ``enospc-record``
  (the next run.json write does);
- ``FAULT_STEP_SLEEP=<seconds>``: every training step takes that much longer (runs long enough to interrupt).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

import torch

from mugcp_bench.engine.callbacks import StepInfo, TrainCallback, add_callback
from mugcp_bench.methods.base import MethodOutput
from mugcp_bench.methods.coop import CoOp, CoOpConfig
from mugcp_bench.registry import METHODS


@dataclass
class FaultyConfig(CoOpConfig):
    fault_value: str = ""  # nan | inf | -inf | grad ("" = no fault)
    fault_step: int = 0  # global training step from which the fault shows


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@METHODS.register("faulty")
class Faulty(CoOp):
    """CoOp whose loss (or gradient) turns non-finite at a chosen step."""

    name = "faulty"
    Config = FaultyConfig

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._steps = 0

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        out = super().forward(images, keys, image_features)
        if not self.training or not self.cfg.fault_value:
            return out
        hit = self._steps >= self.cfg.fault_step
        self._steps += 1
        if self.cfg.fault_value == "grad":
            logits = _NanGrad.apply(out.logits) if hit else out.logits
            return MethodOutput(logits, out.losses)
        value = float(self.cfg.fault_value) if hit else 0.0
        return MethodOutput(out.logits, {**out.losses, "fault": out.logits.new_tensor(value)})


class FaultAt(TrainCallback):
    """Does `action` the `nth` time training reaches step `step` (or the end, step "end") of epoch `epoch`."""

    def __init__(self, epoch: int, step: str, action: str, nth: int = 1) -> None:
        self.epoch, self.step, self.action, self.left = epoch, step, action, nth

    def on_step_end(self, info: StepInfo) -> None:
        if self.step != "end" and (info.epoch, info.step) == (self.epoch, int(self.step)):
            self._hit()

    def on_epoch_end(self, info: StepInfo) -> None:
        if self.step == "end" and info.epoch == self.epoch:
            self._hit()

    def _hit(self) -> None:
        self.left -= 1
        if self.left != 0:
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        elif self.action in ("enospc", "enospc-record"):
            _fail_next_write("checkpoint.pt" if self.action == "enospc" else "run.json")
        else:
            raise ValueError(f"FAULT_AT: unknown action {self.action!r}")


def _fail_next_write(name: str) -> None:
    """Make the next atomic write of a file called `name` find the disk full (ENOSPC from its final rename)."""
    original = os.replace

    def replace(src, dst, *a, **kw):
        if os.path.basename(str(dst)) == name:
            os.replace = original
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return original(src, dst, *a, **kw)

    os.replace = replace


class SlowSteps(TrainCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, info: StepInfo) -> None:
        time.sleep(self.seconds)


if os.environ.get("FAULT_STEP_SLEEP"):
    add_callback(SlowSteps(float(os.environ["FAULT_STEP_SLEEP"])))
if os.environ.get("FAULT_AT"):
    e, s, a, *n = os.environ["FAULT_AT"].split(":")
    add_callback(FaultAt(int(e), s, a, int(n[0]) if n else 1))
