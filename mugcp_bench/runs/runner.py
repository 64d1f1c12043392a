"""Planner and in-process executor: expand a command into keyed runs, skip complete ones, train, evaluate, record.

Every run is self-contained: it reads its key and config, writes only its own run directory and the shared
content-keyed caches, and never depends on another run having happened in the same process — so an executor with
one worker per GPU (or a Ray cluster) can take the same plan.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mugcp_bench.atomic import atomic_torch_save
from mugcp_bench.datasets.base import get_spec, prepare
from mugcp_bench.engine.callbacks import TrainCallback
from mugcp_bench.engine.features import image_features
from mugcp_bench.engine.resources import PeakMemory
from mugcp_bench.engine.trainer import (
    backbone_precision,
    check_backbone,
    evaluate,
    fit,
    load_saved_state,
    prepare_method,
    resolve_precision,
    set_seed,
)
from mugcp_bench.errors import DiskFull, NonFiniteLoss, RunFailed, RunInterrupted, UserError
from mugcp_bench.methods.base import Method, TrainConfig, apply_overrides, split_overrides
from mugcp_bench.model.backbone import Backbone, load_backbone
from mugcp_bench.protocols import EvalTarget, Protocol, Suite, TrainTarget, plan_protocol
from mugcp_bench.registry import METHODS, suggest
from mugcp_bench.runs.settings import check_ranges
from mugcp_bench.store import predictions
from mugcp_bench.store.records import RunKey, RunRecord, config_hash

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Options shared by every run of a sweep."""

    results_dir: Path
    data_root: Path
    cache_dir: Path
    backbone: str = "tiny"
    pretrained: str | None = None
    recipe: str = "paper"
    device: str = "cpu"
    precision: str = "auto"
    overrides: dict[str, str] = field(default_factory=dict)
    force: bool = False
    resume: bool = True
    workers: int = 0
    fast_eval: bool = True
    tensorboard: bool = False  # write TensorBoard event files per run (<run dir>/tensorboard/)


@dataclass
class PlannedRun:
    key: RunKey
    method: str
    variant: str
    method_config: Any
    train_config: TrainConfig
    train: TrainTarget
    evals: tuple[EvalTarget, ...]
    record: RunRecord
    action: str  # skip | train | resume | evaluate

    @property
    def label(self) -> str:
        k = self.key
        return f"{k.method_label} {k.train_dataset} {k.classes} {k.shots}-shot seed {k.seed}"


def resolve_methods(names: Sequence[str]) -> list[str]:
    out = []
    for n in names:
        if "*" in n or "?" in n:
            matched = METHODS.names(n)
            if not matched:
                raise UserError(f"no method matches '{n}'; run 'mugcp-bench list methods'")
            out.extend(matched)
        else:
            out.append(METHODS.canonical(n))
    return list(dict.fromkeys(out))


def variant_overrides(method_cls: type[Method], drop: str) -> dict[str, Any]:
    """Config overrides of ablation `drop` (variant `no-<drop>`)."""
    if drop not in method_cls.ablations:
        names = list(method_cls.ablations)
        raise UserError(
            f"method '{method_cls.name}' has no ablation '{drop}'.{suggest(drop, names)} "
            f"Ablations: {', '.join(names) or 'none'}"
        )
    return dict(method_cls.ablations[drop])


def resolve_configs(
    method_cls: type[Method], recipe: str, train: TrainTarget, variant_cfg: dict[str, Any], user: dict[str, str]
) -> tuple[Any, TrainConfig]:
    """Method config and TrainConfig: defaults <- recipe <- ablation variant <- --set overrides."""
    rm, rt = split_overrides(method_cls, method_cls.recipe(recipe, train.train_protocol, train.shots, train.dataset))
    um, ut = split_overrides(method_cls, user)
    cfg = method_cls.make_config({**rm, **variant_cfg})
    cfg = apply_overrides(cfg, um, method_cls.name)
    tcfg = apply_overrides(apply_overrides(TrainConfig(), rt, "training"), ut, "training")
    check_ranges(tcfg, "training")  # every setting within its range, at planning time (mugcp_bench/runs/settings.py)
    check_ranges(cfg, f"method '{method_cls.name}'")
    return cfg, tcfg


def plan(
    opts: RunOptions,
    backbone: Backbone,
    methods: Sequence[str],
    protocols: Sequence[Protocol],
    suite: Suite,
    datasets: tuple[str, ...] | None,
    shots: tuple[int, ...] | None,
    seeds: Sequence[int],
    variants: dict[str, list[str]] | None = None,
) -> list[PlannedRun]:
    """Expand methods × protocols × datasets × shots × seeds (× ablation variants) into keyed runs."""
    device = torch.device(opts.device)
    precision = resolve_precision(opts.precision, device)
    check_backbone(backbone, precision)
    runs: dict[str, PlannedRun] = {}
    for name in methods:
        method_cls = METHODS.get(name)
        for drop in [""] + list((variants or {}).get(name, [])):
            vcfg = variant_overrides(method_cls, drop) if drop else {}
            variant = f"no-{drop}" if drop else ""
            for protocol in protocols:
                for train, evals in plan_protocol(protocol, suite, datasets, shots):
                    for seed in seeds:
                        cfg, tcfg = resolve_configs(method_cls, opts.recipe, train, vcfg, opts.overrides)
                        key = RunKey(
                            train_protocol=train.train_protocol,
                            method=name,
                            variant=variant,
                            recipe=opts.recipe,
                            backbone=backbone.name,
                            pretrained=backbone.pretrained if not Path(backbone.pretrained).exists() else "file",
                            weights=backbone.weights_hash[:12],
                            train_dataset=train.dataset,
                            classes=train.classes,
                            shots=train.shots,
                            seed=seed,
                            precision=precision,
                            config_hash=config_hash([asdict(cfg), asdict(tcfg), backbone.transform_version]),
                            activation=backbone.activation,
                        )
                        if key.id in runs:  # cross-dataset + DG share the source run: merge evaluations
                            prev = runs[key.id]
                            prev.evals = tuple(dict.fromkeys([*prev.evals, *evals]))
                            continue
                        record = RunRecord(opts.results_dir, key)
                        runs[key.id] = PlannedRun(key, name, variant, cfg, tcfg, train, evals, record, "")
    _check_records(list(runs.values()), opts.force)
    for run in runs.values():
        run.action = decide_action(run, opts)
    return list(runs.values())


def _check_records(runs: Sequence[PlannedRun], force: bool) -> None:
    """store.py's rule for run.json files that cannot be used: a damaged one is retrained (one warning line each; the
    file is kept aside as run.json.corrupt when the run starts); one of another schema is refused (UserError) unless
    --force retrains it."""
    foreign = [r.record.problem for r in runs if r.record.problem is not None and r.record.problem.kind == "schema"]
    if foreign and not force:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(
            f"{foreign[0].line()}{more}: upgrade mugcp-bench to use it, or pass --force to retrain (the old record is "
            "kept aside)"
        )
    for r in runs:
        if r.record.problem is not None and r.record.problem.kind == "damaged":
            log.warning("%s: it is kept as run.json.corrupt and the run trained again", r.record.problem.line())


def decide_action(run: PlannedRun, opts: RunOptions) -> str:
    """What a run needs from its record: train, resume (from its checkpoint), evaluate (missing targets) or skip."""
    status = run.record.status
    if opts.force or status == "new":
        return "train"
    if status == "complete":
        missing = [e for e in run.evals if not run.record.has_evaluation(e.protocol, e.dataset, e.classes)]
        return "evaluate" if missing and run.record.model_path.is_file() else ("skip" if not missing else "train")
    # running by a dead process (stale), failed, or interrupted: resume from the last epoch checkpoint
    if opts.resume and run.record.checkpoint_path.is_file():
        return "resume"
    if status == "running":  # alive elsewhere: leave it
        return "skip"
    return "train"


# --- execution ---------------------------------------------------------------------------------------------------
def _eval_split(run: PlannedRun, target: EvalTarget, opts: RunOptions):
    seed = run.key.seed
    if target.protocol == "base2novel":
        subset = "base" if target.classes == "base" else "new"
        return prepare(target.dataset, opts.data_root, run.key.shots, seed, subset, opts.cache_dir)
    if target.dataset == run.key.train_dataset:
        return prepare(target.dataset, opts.data_root, run.key.shots, seed, "all", opts.cache_dir)
    return prepare(target.dataset, opts.data_root, None, seed, "all", opts.cache_dir)


def execute(run: PlannedRun, backbone: Backbone, opts: RunOptions, callbacks: Sequence[TrainCallback] = ()) -> None:
    """Train (or resume) and evaluate one run; the record ends complete, failed (then RunFailed is raised) or
    interrupted (Ctrl-C: KeyboardInterrupt / RunInterrupted propagates)."""
    device = torch.device(opts.device)
    record = run.record
    method_cls = METHODS.get(run.method)
    spec = get_spec(run.key.train_dataset)
    set_seed(run.key.seed)  # as Dassl: seed before building the dataset (few-shot sampling uses its own RNG)
    data = prepare(run.key.train_dataset, opts.data_root, run.key.shots, run.key.seed, run.key.classes, opts.cache_dir)
    method = method_cls(backbone, data.classnames, run.method_config, template=spec.template, dataset=spec.name)
    prepare_method(method, device, run.key.precision)  # device and parameter dtypes (reference-fp16: as the reference)
    config = {
        "method": asdict(run.method_config),
        "train": asdict(run.train_config),
        "transform": backbone.transform_version,
    }
    record.start(config, method.n_trainable(), run.train_config.eval_batch_size)
    # All parameters the method holds (DCP's official preset keeps a text half that never gets a gradient).
    record.data["method_params"] = sum(p.numel() for p in method.parameters())
    if method_cls.reconstructed:
        record.data["reconstructed"] = True
    precision = run.key.precision
    timings = record.data.setdefault("timings", {})
    memory = PeakMemory(device)
    if run.action == "evaluate" and load_saved_state(record.model_path, method, checkpoint=False) is None:
        run.action = "train"  # the stored model cannot be used (kept aside): train it again, evaluate it all again
        record.data["evaluations"] = []
    try:
        if run.action in ("train", "resume"):
            if run.action == "train" and record.checkpoint_path.exists():
                record.checkpoint_path.unlink()
            record.data["train_info"] = method.prepare_images(data.train, "train")
            if type(method).prepare_images is not Method.prepare_images:
                # side data (MuGCP's descriptions) of every evaluation split before training: missing entries
                # under --no-describe fail now, not after the training they would waste
                for target in run.evals:
                    method.prepare_images(_eval_split(run, target, opts).test, "test")
            record.data["n_train"] = len(data.train)
            record.data["n_classes"] = data.num_classes
            if run.train_config.epochs > 0 and method.n_trainable() > 0:
                res = fit(
                    method,
                    data.train,
                    run.train_config,
                    backbone.train_transform(run.train_config.crop_min_scale),
                    device,
                    precision,
                    run.key.seed,
                    checkpoint=record.checkpoint_path,
                    resume=run.action == "resume",
                    workers=opts.workers,
                    callbacks=callbacks,
                    dataset=spec.name,
                )
                timings["train_s"] = round(res.train_s, 3)
                timings["train_images_per_s"] = round(res.images_per_s, 2)
                record.data["last_loss"] = res.last_loss
                record.data["history"] = res.history
            atomic_torch_save(method.trainable_state(), record.model_path)
        record.save()
        # only once the record holds the training's results: a crash or a full disk before this point resumes from
        # the last epoch's checkpoint (nothing to train, same numbers) instead of training again
        record.checkpoint_path.unlink(missing_ok=True)
        t_eval, n_eval = time.perf_counter(), 0
        for target in run.evals:
            if run.action == "evaluate" and record.has_evaluation(target.protocol, target.dataset, target.classes):
                continue
            split = _eval_split(run, target, opts)
            tspec = get_spec(target.dataset)
            method.set_classnames(split.classnames, template=tspec.template, dataset=tspec.name)
            info = method.prepare_images(split.test, "test")
            feats = None
            if opts.fast_eval and method_cls.frozen_image_path:
                feats = image_features(
                    backbone,
                    split.test,
                    backbone.test_transform,
                    device,
                    precision,
                    opts.cache_dir,
                    run.train_config.eval_batch_size,
                    tspec.name,
                    opts.workers,
                )
            result = evaluate(
                method,
                split.test,
                backbone.test_transform,
                device,
                precision,
                run.train_config.eval_batch_size,
                image_features=feats,
                fast=opts.fast_eval,
                workers=opts.workers,
                dataset=tspec.name,
            )
            evaluation = {
                "protocol": target.protocol,
                "dataset": target.dataset,
                "split": "test",
                "classes": target.classes,
                "n_classes": len(split.classnames),
                **{k: result[k] for k in ("n", "accuracy", "accuracy_1dp")},
                "leakage": info.get("leakage"),
                "eval_batch_size": run.train_config.eval_batch_size,
                "predictions": predictions.write(
                    record.dir, target.protocol, target.dataset, target.classes, result, split.test, split.classnames
                ),
            }
            n_eval += result["n"]
            record.add_evaluation(evaluation)
            log.info("%s -> %s %s: %.2f%%", run.label, target.dataset, target.classes, result["accuracy"])
        previous = timings.get("eval_s", 0.0) if run.action == "evaluate" else 0.0  # evaluate-only adds targets
        timings["eval_s"] = round(previous + time.perf_counter() - t_eval, 3)
        if n_eval:
            timings["eval_images_per_s"] = round(n_eval / max(time.perf_counter() - t_eval, 1e-9), 2)
        _record_resources(record.data, memory.stop(), keep_peak=run.action == "evaluate")
        if opts.tensorboard:
            from mugcp_bench.runs.tensorboard_events import write_run_events

            write_run_events(record.dir, record.data)
        record.finish("complete")
    except KeyboardInterrupt as e:
        # Ctrl-C: training saved a checkpoint where it stopped (RunInterrupted) or keeps its last epoch's; a rerun
        # resumes from it (docs/protocol.md §4)
        where = f" at epoch {e.epoch + 1}, step {e.step}" if isinstance(e, RunInterrupted) else ""
        try:
            record.finish("interrupted", f"interrupted by Ctrl-C{where}; rerun the same command to resume")
        except DiskFull:
            log.warning("%s: could not record the interruption in %s (disk full)", run.label, record.path)
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        reason = first if isinstance(e, NonFiniteLoss) else f"{type(e).__name__}: {first}"
        record.data["traceback"] = traceback.format_exc()
        if isinstance(e, NonFiniteLoss):
            record.data["failure"] = e.details()
        try:
            record.finish("failed", reason)
        except DiskFull:  # the disk is too full even for the record: it stays `running`, a rerun resumes
            log.warning("%s: could not record the failure in %s (disk full)", run.label, record.path)
        if isinstance(e, UserError):
            raise
        raise RunFailed(f"{run.label}: {reason}") from e


def _record_resources(data: dict[str, Any], measured: dict[str, Any], keep_peak: bool) -> None:
    """Store the run's device and peak memory; an evaluate-only pass keeps the training's peak if that was higher."""
    previous = data.get("resources") or {}
    if keep_peak and previous.get("memory_measure") == measured["memory_measure"]:
        measured["peak_memory_mb"] = max(measured["peak_memory_mb"], previous.get("peak_memory_mb") or 0.0)
    data["resources"] = measured


_BACKBONES: dict[tuple[str, str, str, str], Backbone] = {}


def get_backbone(name: str, pretrained: str | None, device: str, precision: str = "auto") -> Backbone:
    """One backbone per (name, weights, device, weight precision), shared by all runs of a sweep in this process.

    `precision` is the sweep's (resolved or not): reference-fp16 needs the backbone's weights in fp16."""
    weights = backbone_precision(precision)
    key = (name, pretrained or "random", device, weights)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(name, pretrained, device=device, precision=weights)
    return _BACKBONES[key]


def summarize(runs: Sequence[PlannedRun]) -> dict[str, int]:
    out = {"runs": len(runs)}
    for r in runs:
        out[r.action] = out.get(r.action, 0) + 1
    return out
