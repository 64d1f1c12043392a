"""The job: one run, start to end. Claim it, re-read its record, decide its action (the planner's rule), train or
resume, evaluate, record, release.

`perform` is the same code in the sweep's own process (local), in a worker process per device (gpus) and in a Ray
task (ray); everything it needs travels in a picklable `RunTask` and `RunSettings`. It never raises for a failed
run: the record says why, and so does the returned `TaskResult`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mugcp_bench.datasets.base import get_spec, prepare
from mugcp_bench.engine.callbacks import StepInfo, TrainCallback
from mugcp_bench.engine.interrupts import StopFile, request_stop
from mugcp_bench.engine.resources import PeakMemory
from mugcp_bench.engine.trainer import backbone_precision, evaluate, fit, load_saved_state, prepare_method, set_seed
from mugcp_bench.errors import DiskFull, NonFiniteLoss, RunFailed, RunInterrupted, UserError
from mugcp_bench.frozen.features import features_key, image_features
from mugcp_bench.methods.base import Method
from mugcp_bench.model.backbone import Backbone, load_backbone
from mugcp_bench.protocols import EvalTarget
from mugcp_bench.registry import METHODS
from mugcp_bench.runs.options import RunSettings
from mugcp_bench.runs.plan import QUIET_OVERRIDES, Action, PlannedRun, decide_action
from mugcp_bench.store import predictions
from mugcp_bench.store.claims import Claim, new_token
from mugcp_bench.store.records import Evaluation, Record, RunRecord, RunStatus

log = logging.getLogger(__name__)


# --- what an executor hands out and gets back ---------------------------------------------------------------------
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
    time the claim was taken) or `claimed` (someone else holds a live claim); `status` is the record's (or "not
    started" when the sweep was interrupted first). `accuracies` maps "dataset classes" to the run's accuracy (%)
    of each evaluation; `seconds` is the job's wall time."""

    id: str
    label: str
    action: str
    status: str
    reason: str | None = None
    host: str = ""
    pid: int = 0
    user_error: bool = False  # the failure is bad input found while running (exit 2 under the local executor)
    error: BaseException | None = field(default=None, repr=False)  # local executor only: the exception to re-raise
    seconds: float = 0.0
    accuracies: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == RunStatus.FAILED


class ClaimLost(BaseException):
    """Raised from the job's training callback when another owner took the run's claim over (this one was judged
    stale): training stops at once, and, being no `Exception`, it passes `execute` without writing the record it no
    longer owns."""


# --- backbones, shared by the runs of a process ---------------------------------------------------------------------
_BACKBONES: dict[tuple[str, str, str, str], Backbone] = {}


def get_backbone(name: str, pretrained: str | None, device: str, precision: str = "fp32") -> Backbone:
    """One backbone per (name, weights, device, weight precision), shared by all runs of a sweep in this process.

    `precision` is the training precision: reference-fp16 needs the backbone's weights in fp16."""
    weights = backbone_precision(precision)
    key = (name, pretrained or "random", device, weights)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(name, pretrained, device=device, precision=weights)
    return _BACKBONES[key]


# --- the run's own log file -----------------------------------------------------------------------------------------
class RunLabelFilter(logging.Filter):
    """Adds `run` (the id of the run this process is working on, or "-") to every log record, so a worker's lines
    say which run they belong to."""

    current = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.run = RunLabelFilter.current
        return True


class RunLog(logging.Handler):
    """A run's own log.txt (the Dassl habit: what the run said, beside its record), every line with the run id: what
    the job writes (start, every epoch, every evaluation, the end) and every log record of this process that passes
    its logger's level (warnings by default, more with -v). Global logging levels are left as they are."""

    current: RunLog | None = None  # the log of the run this process is working on

    def __init__(self, record: RunRecord) -> None:
        super().__init__()
        self.path, self.id = record.log_path, record.key.id
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{stamp} {self.id} {text}\n")
        except OSError:  # the log is a help, never a failure
            pass

    def emit(self, record: logging.LogRecord) -> None:
        self.line(self.format(record))


class EpochLines(TrainCallback):
    """One log.txt line per epoch: loss, learning rate, throughput."""

    def __init__(self, log: RunLog) -> None:
        self.log = log

    def on_epoch_end(self, info: StepInfo) -> None:
        rate = f"{info.images_per_s:.0f} img/s"
        self.log.line(f"epoch {info.epoch + 1}/{info.epochs}  loss {info.loss:.4f}  lr {info.lr:.3g}  {rate}")


def note(text: str) -> None:
    """A line in the log.txt of the run this process is working on (nothing outside a job)."""
    if RunLog.current is not None:
        RunLog.current.line(text)


@contextmanager
def run_log(record: RunRecord) -> Iterator[RunLog]:
    """While the job runs: its log.txt receives the job's own lines and this process's log records, and workers'
    console lines name the run (`RunLabelFilter`)."""
    record.dir.mkdir(parents=True, exist_ok=True)
    log_file = RunLog(record)
    root = logging.getLogger()
    previous_run, previous_log = RunLabelFilter.current, RunLog.current
    root.addHandler(log_file)
    RunLabelFilter.current, RunLog.current = record.key.id, log_file
    try:
        yield log_file
    finally:
        RunLabelFilter.current, RunLog.current = previous_run, previous_log
        root.removeHandler(log_file)
        log_file.close()


# --- executing one run ----------------------------------------------------------------------------------------------
def eval_split(run: PlannedRun, target: EvalTarget, settings: RunSettings):
    """The data a run is evaluated on for one target (docs/protocol.md §2)."""
    seed = run.key.seed
    if target.classes in ("base", "novel"):  # a half of the training dataset's classes, sampled as for training
        subset = "base" if target.classes == "base" else "new"
        return prepare(target.dataset, settings.data_root, run.key.shots, seed, subset, settings.cache_dir)
    if target.dataset == run.key.train_dataset:
        return prepare(target.dataset, settings.data_root, run.key.shots, seed, "all", settings.cache_dir)
    return prepare(target.dataset, settings.data_root, None, seed, "all", settings.cache_dir)


def execute(
    run: PlannedRun, backbone: Backbone, settings: RunSettings, callbacks: Sequence[TrainCallback] = ()
) -> dict[str, float]:
    """Do `run.action` (train, resume or evaluate) and record it; returns the accuracy of every evaluation done.

    The record ends complete, failed (then RunFailed is raised, or the UserError for bad data found while running) or
    interrupted (Ctrl-C: KeyboardInterrupt / RunInterrupted propagates)."""
    device = torch.device(settings.device)
    record = run.record
    method_cls = METHODS.get(run.method)
    spec = get_spec(run.key.train_dataset)
    set_seed(run.key.seed)  # as Dassl: seed before building the dataset (few-shot sampling uses its own RNG)
    try:
        data = prepare(
            run.key.train_dataset, settings.data_root, run.key.shots, run.key.seed, run.key.classes, settings.cache_dir
        )
        method = method_cls(backbone, data.classnames, run.method_config, template=spec.template, dataset=spec.name)
        prepare_method(method, device, run.key.precision)  # device and dtypes (reference-fp16: as the reference)
    except Exception as e:  # the data or the method could not be built: a failed run, recorded with its reason
        _failed(run, e)
    config = {
        "method": asdict(run.method_config),
        "train": asdict(run.train_config),
        "transform": backbone.transform_version,
    }
    record.start(config, method.n_trainable(), run.train_config.eval_batch_size, versions())
    rec = record.rec
    rec.overrides = {k: v for k, v in run.overrides.items() if k not in QUIET_OVERRIDES}
    # All parameters the method holds (DCP's official preset keeps a text half that never gets a gradient).
    rec.method_params = sum(p.numel() for p in method.parameters())
    rec.display = {"order": method_cls.report_order, "color": method_cls.color}
    if run.key.origin == "trained":
        source = method_cls.provenance.get(run.key.recipe)
        rec.provenance = source.for_protocol(run.key.train_protocol) if source is not None else None
    else:  # the checkpoint's own origin, as the import recorded it
        imported = rec.imported or {}
        rec.provenance = {k: str(imported.get(k, "")) for k in ("repo", "commit", "config")}
        rec.provenance["note"] = f"imported from {imported.get('path', '?')}"
    rec.reconstructed = method_cls.reconstructed
    timings = rec.timings
    memory = PeakMemory(device)
    accuracies: dict[str, float] = {}
    try:
        if run.action == Action.EVALUATE and load_saved_state(record.model_path, method, checkpoint=False) is None:
            if run.key.origin == "imported":
                raise UserError(f"{record.model_path}: the imported model cannot be used; import the checkpoint again")
            # the stored model cannot be used (kept aside with one warning line): train it, evaluate it all again
            run.action = Action.TRAIN
            rec.evaluations = []
        if run.action in (Action.TRAIN, Action.RESUME):
            _train(run, method, data, backbone, settings, callbacks)
        record.save()
        # only once the record holds the training's results: a crash or a full disk before this point resumes from
        # the last epoch's checkpoint (nothing to train, same numbers) instead of training again
        record.checkpoint_path.unlink(missing_ok=True)
        t_eval, n_eval = time.perf_counter(), 0
        for target in run.evals:
            if run.action == Action.EVALUATE and record.has_evaluation(target.protocol, target.dataset, target.classes):
                continue
            evaluation = _evaluate(run, method, target, backbone, settings)
            n_eval += evaluation.n
            record.add_evaluation(evaluation)
            accuracies[f"{target.dataset} {target.classes}"] = evaluation.accuracy
            log.info("%s -> %s %s: %.2f%%", run.label, target.dataset, target.classes, evaluation.accuracy)
            note(f"{target.protocol} {target.dataset} {target.classes}: {evaluation.accuracy:.2f}% of {evaluation.n}")
        previous = timings.get("eval_s", 0.0) if run.action == Action.EVALUATE else 0.0  # evaluate-only adds targets
        timings["eval_s"] = round(previous + time.perf_counter() - t_eval, 3)
        if n_eval:
            timings["eval_images_per_s"] = round(n_eval / max(time.perf_counter() - t_eval, 1e-9), 2)
        _record_resources(rec, memory.stop(), keep_peak=run.action == Action.EVALUATE)
        if settings.tensorboard:
            from mugcp_bench.runs.tensorboard_events import write_run_events

            write_run_events(record.dir, rec.to_dict())
        record.finish(RunStatus.COMPLETE)
    except KeyboardInterrupt as e:
        # Ctrl-C: training saved a checkpoint where it stopped (RunInterrupted) or keeps its last epoch's; a rerun
        # resumes from it (docs/protocol.md §4)
        where = f" at epoch {e.epoch + 1}, step {e.step}" if isinstance(e, RunInterrupted) else ""
        try:
            record.finish(RunStatus.INTERRUPTED, f"interrupted by Ctrl-C{where}; rerun the same command to resume")
        except DiskFull:
            log.warning("%s: could not record the interruption in %s (disk full)", run.label, record.path)
        raise
    except Exception as e:
        _failed(run, e)
    return accuracies


def _failed(run: PlannedRun, e: Exception) -> None:
    """Record the run as failed with its reason (and traceback), then raise: the UserError itself (bad data found while
    running), else RunFailed."""
    record, rec = run.record, run.record.rec
    first = str(e).splitlines()[0] if str(e) else ""
    reason = first if isinstance(e, NonFiniteLoss) else f"{type(e).__name__}: {first}"
    rec.traceback = traceback.format_exc()
    if isinstance(e, NonFiniteLoss):
        rec.failure = e.details()
    try:
        record.finish(RunStatus.FAILED, reason)
    except DiskFull:  # the disk is too full even for the record: it stays as it was, a rerun resumes
        log.warning("%s: could not record the failure in %s (disk full)", run.label, record.path)
    if isinstance(e, UserError):
        raise e
    raise RunFailed(f"{run.label}: {reason}") from e


def _train(run: PlannedRun, method: Method, data, backbone: Backbone, settings: RunSettings, callbacks) -> None:
    """Train (or resume) the method and store its trainable state as model.pt."""
    from mugcp_bench.tensor_files import atomic_torch_save

    record = run.record
    if run.action == Action.TRAIN and record.checkpoint_path.exists():
        record.checkpoint_path.unlink()
    record.rec.train_info = method.prepare_images(data.train, "train")
    if type(method).prepare_images is not Method.prepare_images:
        # side data (MuGCP's descriptions) of every evaluation split before training: missing entries under
        # --no-describe fail now, not after the training they would waste
        for target in run.evals:
            method.prepare_images(eval_split(run, target, settings).test, "test")
    record.rec.n_train = len(data.train)
    record.rec.n_classes = data.num_classes
    if run.train_config.epochs > 0 and method.n_trainable() > 0:
        res = fit(
            method,
            data.train,
            run.train_config,
            backbone.train_transform(run.train_config.crop_min_scale),
            torch.device(settings.device),
            run.key.precision,
            run.key.seed,
            checkpoint=record.checkpoint_path,
            resume=run.action == Action.RESUME,
            workers=settings.workers,
            dataset=get_spec(run.key.train_dataset).name,
            callbacks=callbacks,
        )
        rec = record.rec
        rec.timings["train_s"] = round(res.train_s, 3)
        rec.timings["train_images_per_s"] = round(res.images_per_s, 2)
        rec.last_loss = res.last_loss
        rec.history = res.history
    atomic_torch_save(method.trainable_state(), record.model_path)


def _evaluate(
    run: PlannedRun, method: Method, target: EvalTarget, backbone: Backbone, settings: RunSettings
) -> Evaluation:
    """One evaluation of the trained method, as the record stores it (predictions written beside it)."""
    split = eval_split(run, target, settings)
    tspec = get_spec(target.dataset)
    method.set_classnames(split.classnames, template=tspec.template, dataset=tspec.name)
    info = method.prepare_images(split.test, "test")
    cached = _untrained_evaluation(run, method, split, backbone, settings)
    result = cached.load() if cached is not None else None
    if result is None:
        result = _evaluate_split(run, method, split, tspec, backbone, settings)
        if cached is not None:
            cached.save(result)
    return Evaluation(
        protocol=target.protocol,
        dataset=target.dataset,
        classes=target.classes,
        n_classes=len(split.classnames),
        n=result["n"],
        accuracy=result["accuracy"],
        accuracy_1dp=result["accuracy_1dp"],
        leakage=info.get("leakage"),
        eval_batch_size=run.train_config.eval_batch_size,
        predictions=predictions.write(
            run.record.dir, target.protocol, target.dataset, target.classes, result, split.test, split.classnames
        ),
    )


@dataclass
class _CachedEvaluation:
    """The evaluation of a method that trains nothing (zero-shot CLIP): the same for every seed and shot count, so
    it is computed once per test list and kept in the cache folder (content-keyed, written atomically; the key holds
    every image's size and modification time, as the feature cache's: a replaced or damaged image is read again)."""

    path: Path

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                out = {k: z[k] for k in ("predictions", "top5")}
                out |= {k: z[k].item() for k in ("n", "correct", "accuracy", "accuracy_1dp")}
            return out
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is computed again
            log.warning("evaluation cache %s unreadable (%s); evaluating again", self.path, type(e).__name__)
            return None

    def save(self, result: dict[str, Any]) -> None:
        from mugcp_bench.atomic import atomic_path

        try:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **{k: np.asarray(result[k]) for k in ("predictions", "top5", "n", "correct", "accuracy",
                                                                 "accuracy_1dp")})  # fmt: skip
        except OSError as e:  # a cache is a saving, never a failure
            log.warning("could not cache the evaluation in %s (%s)", self.path, e)


def _untrained_evaluation(run: PlannedRun, method: Method, split, backbone: Backbone, settings: RunSettings):
    if type(method).trains:
        return None
    # features_key: the weights, transform, image size, precision and every test image (path, label, size, mtime)
    blob = json.dumps(
        [run.method, run.config()["method"], run.train_config.eval_batch_size, backbone.name, list(split.classnames),
         method.template, features_key(backbone, split.test, run.key.precision)],
        sort_keys=True, default=str,
    )  # fmt: skip
    return _CachedEvaluation(
        settings.cache_dir / "evaluations" / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.pt"
    )


def _evaluate_split(run: PlannedRun, method: Method, split, tspec, backbone: Backbone, settings: RunSettings) -> dict:
    """`engine.trainer.evaluate` on one split, with the frozen image features cached where the method allows."""
    device = torch.device(settings.device)
    feats = None
    if type(method).frozen_image_path:
        feats = image_features(
            backbone,
            split.test,
            backbone.test_transform,
            device,
            run.key.precision,
            settings.cache_dir,
            run.train_config.eval_batch_size,
            tspec.name,
            settings.workers,
        )
    return evaluate(
        method,
        split.test,
        backbone.test_transform,
        device,
        run.key.precision,
        run.train_config.eval_batch_size,
        image_features=feats,
        workers=settings.workers,
        dataset=tspec.name,
    )


def _record_resources(rec: Record, measured: dict[str, Any], keep_peak: bool) -> None:
    """Store the run's device and peak memory; an evaluate-only pass keeps the training's peak if that was higher."""
    previous = rec.resources
    if keep_peak and previous.get("memory_measure") == measured["memory_measure"]:
        measured["peak_memory_mb"] = max(measured["peak_memory_mb"], previous.get("peak_memory_mb") or 0.0)
    rec.resources = measured


def versions() -> dict[str, str]:
    """The software a run ran with (recorded in run.json)."""
    import platform

    import open_clip

    import mugcp_bench

    out = {
        "mugcp_bench": mugcp_bench.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
    return out


# --- the job ----------------------------------------------------------------------------------------------------------
def perform(
    task: RunTask,
    settings: RunSettings,
    progress: Callable[[dict[str, Any]], None] | None = None,
    keep_error: bool = False,
) -> TaskResult:
    """Claim, re-read, decide, execute and release one run; never raises for a failed run (see `TaskResult`).
    `progress` gets every training step's `StepInfo.as_dict()`."""
    from mugcp_bench.plugins import load_plugins

    for k, v in settings.env.items():
        os.environ.setdefault(k, v)
    load_plugins()  # a worker did not start through the CLI: out-of-tree methods and callbacks (once per process)
    run = task.run
    t0 = time.perf_counter()
    base = {"id": task.id, "label": task.label, "host": socket.gethostname(), "pid": os.getpid()}
    stop = StopFile(settings.stop_file) if settings.stop_file else None
    if stop is not None and stop.seen():  # the sweep was interrupted before this run started: leave it untouched
        return TaskResult(**base, action=Action.SKIP.value, status="not started", reason="the sweep was interrupted")
    claim = Claim(RunRecord(settings.results_dir, run.key).dir, task.token, settings.claim_timeout)
    if not claim.acquire():
        holder = claim.previous
        who = holder.describe() if holder else "another process"
        return TaskResult(
            **base, action=Action.CLAIMED.value, status=RunStatus.RUNNING.value, reason=f"claimed by {who}"
        )
    try:
        run.record = RunRecord(settings.results_dir, run.key)  # as it is now, not as it was when planned
        run.action = decide_action(run, settings)  # we hold the claim: nobody else is on it
        if run.action == Action.SKIP:
            return TaskResult(**base, action=run.action.value, status=run.record.status.value)
        attempt = {"action": run.action.value, "host": base["host"], "pid": base["pid"], "time": time.time()}
        run.record.rec.attempts.append(attempt)
        backbone = get_backbone(settings.backbone, settings.pretrained, settings.device, settings.precision)

        class Watch(TrainCallback):
            """Stops training when the claim is lost or the sweep asks to stop; forwards progress."""

            def on_step_end(self, info: StepInfo) -> None:
                if claim.lost is not None:
                    raise ClaimLost(claim.lost.describe())
                if stop is not None and stop.seen():
                    request_stop()  # the trainer checkpoints after this step and raises RunInterrupted
                if progress is not None:
                    progress(info.as_dict())

        def result(status: str, **kw: Any) -> TaskResult:
            return TaskResult(**base, action=run.action.value, status=status, seconds=time.perf_counter() - t0, **kw)

        try:
            with run_log(run.record) as log_file:
                log_file.line(
                    f"{run.action.value} {run.label} on {settings.device} ({base['host']}, pid {base['pid']})"
                )
                accuracies = execute(run, backbone, settings, callbacks=[Watch(), EpochLines(log_file)])
                log_file.line(f"{run.record.status.value} in {time.perf_counter() - t0:.1f} s")
        except ClaimLost as e:
            log.warning("%s: the claim was taken over by %s; leaving the run to it", task.label, e)
            return result(RunStatus.RUNNING.value, reason=f"claim taken over by {e}")
        except (RunFailed, UserError) as e:
            return result(
                RunStatus.FAILED.value,
                reason=run.record.rec.reason or str(e),
                user_error=isinstance(e, UserError),
                error=e if keep_error else None,
            )
        return result(run.record.status.value, accuracies=accuracies)
    finally:
        claim.release()


def record_failure(task: RunTask, settings: RunSettings, reason: str) -> TaskResult:
    """A run that failed outside `perform` (its worker died too often, its task could not be sent): write the failure
    into its record (under its claim, taken back with the task's token) and return the result saying so."""
    result = TaskResult(task.id, task.label, Action.TRAIN.value, RunStatus.FAILED.value, reason)
    claim = Claim(RunRecord(settings.results_dir, task.run.key).dir, task.token, settings.claim_timeout)
    if not claim.acquire():
        return result
    try:
        record = RunRecord(settings.results_dir, task.run.key)
        if record.status != RunStatus.COMPLETE:
            record.finish(RunStatus.FAILED, reason)
    except OSError as e:
        log.warning("%s: could not record the failure in its run.json (%s)", task.label, e)
    finally:
        claim.release()
    return result


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
    task: RunTask, settings: RunSettings, progress: Callable[[dict[str, Any]], None] | None = None
) -> TaskResult:
    """`perform` in a worker process (gpus, Ray): an interrupted run (its record says so, its checkpoint kept) is a
    result, so the worker stays usable and the sweep's process decides what the interruption means."""
    try:
        return perform(task, settings, progress=progress)
    except KeyboardInterrupt as e:
        return TaskResult(
            task.id, task.label, Action.TRAIN.value, RunStatus.INTERRUPTED.value, str(e) or "interrupted",
            socket.gethostname(),
        )  # fmt: skip


__all__ = [
    "ClaimLost",
    "RunLabelFilter",
    "RunTask",
    "TaskResult",
    "eval_split",
    "execute",
    "get_backbone",
    "perform",
    "perform_in_worker",
    "record_failure",
    "RunLog",
    "note",
    "run_log",
    "step_reporter",
]
