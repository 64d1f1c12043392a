"""The unit every executor runs: claim a planned run, re-read its record, train / resume / evaluate it, release.

`perform` is the same code in the sweep's own process (local), in a worker process per device (gpus) and in a Ray
task (ray); everything it needs travels in a picklable `RunTask` and `WorkContext`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mugcp_bench.engine.callbacks import StepInfo, TrainCallback
from mugcp_bench.engine.interrupts import StopFile, request_stop
from mugcp_bench.errors import RunFailed, UserError
from mugcp_bench.runs.runner import PlannedRun, RunOptions
from mugcp_bench.store.claims import DEFAULT_TIMEOUT_S, Claim, new_token
from mugcp_bench.store.records import RunRecord

log = logging.getLogger(__name__)

# Environment a worker takes from the sweep's process (caches, offline switches), whatever started the worker.
FORWARDED_ENV = ("MUGCP_CACHE", "MUGCP_PLUGINS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")


@dataclass
class WorkContext:
    """What every run of a sweep shares: run options, the backbone to load and the claim timeout."""

    opts: RunOptions
    backbone: str
    pretrained: str | None
    precision: str
    claim_timeout: float = DEFAULT_TIMEOUT_S
    env: dict[str, str] = field(default_factory=dict)
    stop_file: str | None = None  # created by the sweep at its first Ctrl-C (interrupts.StopFile): stop every run

    @classmethod
    def capture(cls, opts: RunOptions, backbone: str, pretrained: str | None, precision: str, claim_timeout: float):
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        return cls(opts, backbone, pretrained, precision, claim_timeout, env)


@dataclass
class RunTask:
    """One planned run and the claim token of this task (kept by retries of the task)."""

    run: PlannedRun
    token: str = field(default_factory=new_token)

    @property
    def id(self) -> str:
        return self.run.key.id

    @property
    def label(self) -> str:
        return self.run.label


@dataclass
class TaskResult:
    """What became of a task. `action` is what was done (train / resume / evaluate), or `skip` (complete by the
    time the claim was taken) or `claimed` (someone else holds a live claim); `status` is the record's."""

    id: str
    label: str
    action: str
    status: str
    reason: str | None = None
    host: str = ""
    pid: int = 0
    user_error: bool = False  # the failure is bad input found while running (exit 2 under the local executor)
    error: BaseException | None = field(default=None, repr=False)  # local executor only: the exception to re-raise

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def next_action(run: PlannedRun, opts: RunOptions) -> str:
    """The action for a run whose claim we hold: a record left `running` has no live owner, so it is picked up."""
    from mugcp_bench.runs.runner import decide_action

    action = decide_action(run, opts)
    if action == "skip" and run.record.status in ("running", "stale"):
        return "resume" if opts.resume and run.record.checkpoint_path.is_file() else "train"
    return action


class ClaimLost(BaseException):
    """Raised from the progress callback when another owner took the run's claim over (this one was judged stale):
    training stops at once, and, being no `Exception`, it passes `execute` without writing the record it no longer
    owns."""


def perform(
    task: RunTask,
    ctx: WorkContext,
    progress: Callable[[dict[str, Any]], None] | None = None,
    keep_error: bool = False,
) -> TaskResult:
    """Claim, (re)decide, execute and release one run; never raises for a failed run (see `TaskResult`)."""
    from mugcp_bench.plugins import load_plugins
    from mugcp_bench.runs.runner import execute, get_backbone

    for k, v in ctx.env.items():
        os.environ.setdefault(k, v)
    load_plugins()  # a worker did not start through the CLI: out-of-tree methods and callbacks (once per process)
    run = task.run
    base = {"id": task.id, "label": task.label, "host": socket.gethostname(), "pid": os.getpid()}
    stop = StopFile(ctx.stop_file) if ctx.stop_file else None
    if stop is not None and stop.seen():  # the sweep was interrupted before this run started: leave it untouched
        return TaskResult(**base, action="skip", status="not started", reason="the sweep was interrupted")
    claim = Claim(RunRecord(ctx.opts.results_dir, run.key).dir, task.token, ctx.claim_timeout)
    if not claim.acquire():
        holder = claim.previous
        who = holder.describe() if holder else "another process"
        return TaskResult(**base, action="claimed", status="running", reason=f"claimed by {who}")
    try:
        run.record = RunRecord(ctx.opts.results_dir, run.key)  # as it is now, not as it was when planned
        run.action = next_action(run, ctx.opts)
        if run.action == "skip":
            return TaskResult(**base, action="skip", status=run.record.status)
        attempts = run.record.data.setdefault("attempts", [])
        attempts.append({"action": run.action, "host": base["host"], "pid": base["pid"], "time": time.time()})
        backbone = get_backbone(ctx.backbone, ctx.pretrained, ctx.opts.device, ctx.precision)

        class Watch(TrainCallback):
            """Stops training when the claim is lost or the sweep asks to stop; forwards progress."""

            def on_step_end(self, info: StepInfo) -> None:
                if claim.lost is not None:
                    raise ClaimLost(claim.lost.describe())
                if stop is not None and stop.seen():
                    request_stop()  # the trainer checkpoints after this step and raises RunInterrupted
                if progress is not None:
                    progress(info.as_dict())

        try:
            execute(run, backbone, ctx.opts, callbacks=[Watch()])
        except ClaimLost as e:
            log.warning("%s: the claim was taken over by %s; leaving the run to it", task.label, e)
            return TaskResult(**base, action=run.action, status="running", reason=f"claim taken over by {e}")
        except (RunFailed, UserError) as e:
            return TaskResult(
                **base,
                action=run.action,
                status="failed",
                reason=run.record.data.get("reason") or str(e),
                user_error=isinstance(e, UserError),
                error=e if keep_error else None,
            )
        return TaskResult(**base, action=run.action, status=run.record.status)
    finally:
        claim.release()


PROGRESS_INTERVAL_S = 0.5  # a worker reports a run's training step at most this often (and every epoch's last)


def step_reporter(label: str, send: Callable[[tuple[str, dict[str, Any]]], None]) -> Callable[[dict[str, Any]], None]:
    """A `perform` progress callback for a worker process: `send((label, step info))` at most every
    `PROGRESS_INTERVAL_S` and on the last step of every epoch; a failed send never stops the run."""
    last = [0.0]

    def progress(info: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL_S or info["step"] + 1 == info["steps"]:
            last[0] = now
            try:
                send((label, dict(info)))
            except Exception as e:  # noqa: BLE001 - progress is best effort
                log.debug("progress of %s not sent: %s", label, e)

    return progress


def perform_in_worker(
    task: RunTask, ctx: WorkContext, progress: Callable[[dict[str, Any]], None] | None = None
) -> TaskResult:
    """`perform` in a worker process (gpus, Ray): an interrupted run (its record says so, its checkpoint kept) is a
    result, so the worker stays usable and the sweep's process decides what the interruption means."""
    try:
        return perform(task, ctx, progress=progress)
    except KeyboardInterrupt as e:
        return TaskResult(task.id, task.label, "train", "interrupted", str(e) or "interrupted", socket.gethostname())


__all__ = [
    "FORWARDED_ENV",
    "ClaimLost",
    "RunTask",
    "TaskResult",
    "WorkContext",
    "next_action",
    "perform",
    "perform_in_worker",
    "step_reporter",
]
