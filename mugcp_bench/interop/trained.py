"""A trained model as `predict`, `export` and `load_classifier` need it: from a run of the results store (by id or
folder) or from a self-contained ``.mugcp`` file, and the frozen backbone it was trained on (checked by weights hash).

The ``.mugcp`` format (our design; docs/interop.md): one ``torch.save``d dict of plain data — method, variant,
method and training configs, the training class names, dataset and template, the backbone (architecture, weights
tag, weights hash, activation, preprocessing) and the trainable state — loadable with torch's weights-only
unpickler. It does not hold the backbone's weights: they are named, and checked by hash when rebuilt.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mugcp_bench.errors import UserError

log = logging.getLogger(__name__)

MUGCP_FORMAT = "mugcp-bench model"
MUGCP_VERSION = 1
MUGCP_SUFFIX = ".mugcp"
RUN_ID = re.compile(r"^[0-9a-f]{8}$")


@dataclass
class TrainedModel:
    """What rebuilds a trained method: its settings, the classes it was trained on, its backbone and its state."""

    method: str
    variant: str
    method_config: dict[str, Any]
    train_config: dict[str, Any]
    classnames: list[str]  # the training classes, in label order ([] when unknown)
    dataset: str  # the training dataset (registry name)
    template: str  # that dataset's zero-shot template
    backbone: dict[str, Any]  # name, pretrained, weights (hash prefix), activation, transform
    state: dict[str, torch.Tensor]
    run_id: str = ""
    key: dict[str, Any] = field(default_factory=dict)
    imported: dict[str, Any] | None = None  # the reference checkpoint it came from, for imported runs
    source: str = ""  # the run folder or file it was read from

    @property
    def eval_batch_size(self) -> int:
        return int(self.train_config.get("eval_batch_size") or 100)

    @property
    def label(self) -> str:
        name = f"{self.method}-{self.variant}" if self.variant else self.method
        return f"{name} ({self.dataset}, run {self.run_id})" if self.run_id else name


# --- runs of the results store -------------------------------------------------------------------------------------
def find_run_dir(run: str | Path, results_dir: str | Path = "results") -> Path:
    """The folder of run `run`: a run folder (holding run.json), its run.json, or an 8-hex-digit run id looked up in
    `results_dir`; UserError (one line) when there is none."""
    path = Path(run)
    if path.is_dir() and (path / "run.json").is_file():
        return path
    if path.is_file() and path.name == "run.json":
        return path.parent
    text = str(run)
    if RUN_ID.match(text):
        root = Path(results_dir)
        for candidate in sorted(root.glob(f"runs/**/*-{text}/run.json")):
            try:
                if json.loads(candidate.read_text()).get("id") == text:
                    return candidate.parent
            except (OSError, ValueError):
                continue
        raise UserError(
            f"no run with id {text} in {root}; pass --results-dir where it was run, or a run folder or .mugcp file"
        )
    if path.is_dir():
        raise UserError(f"{path} is not a run folder (no run.json); pass a run id, a run folder or a .mugcp file")
    raise UserError(
        f"unknown run '{text}': not a run id (8 hex digits, run.json's \"id\"), a run folder or a .mugcp file"
    )


def _training_classnames(run_dir: Path, record: dict[str, Any]) -> list[str]:
    """The class names of the run's training set, from the predictions file of its evaluation on them."""
    from mugcp_bench.store import predictions

    key = record["key"]
    want = "base" if key.get("classes") == "base" else "all"
    for ev in record.get("evaluations", []):
        ref = ev.get("predictions")
        if ev.get("dataset") == key.get("train_dataset") and ev.get("classes") == want and isinstance(ref, dict):
            try:
                return predictions.read(run_dir / ref["file"], ref.get("sha256")).classnames
            except (predictions.PredictionsError, KeyError):
                continue
    return []


def _template(dataset: str) -> str:
    from mugcp_bench.registry import DATASETS

    try:
        import mugcp_bench.datasets  # noqa: F401 - registers the dataset specs

        return DATASETS.get(dataset).template
    except Exception:  # noqa: BLE001 - an unknown or unregistered dataset: the generic template
        return "a photo of a {}."


def from_run(run: str | Path, results_dir: str | Path = "results") -> TrainedModel:
    """The trained model of a complete run (its run.json and model.pt)."""
    from mugcp_bench.store.records import load_record

    run_dir = find_run_dir(run, results_dir)
    record, problem = load_record(run_dir / "run.json")
    if problem is not None or record is None:
        raise UserError(problem.line() if problem else f"{run_dir}: no run.json")
    status = record.get("status")
    model_path = run_dir / "model.pt"
    if status != "complete" or not model_path.is_file():
        why = f"is {status}" if status != "complete" else "has no model.pt"
        raise UserError(
            f"run {record.get('id', run_dir.name)} ({run_dir}) {why}; finish it with the same 'run' command"
        )
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file: one line
        raise UserError(f"{model_path} cannot be read ({type(e).__name__}); rerun the run with --force") from None
    key = record["key"]
    config = record.get("config", {})
    return TrainedModel(
        method=key["method"],
        variant=key.get("variant", ""),
        method_config=dict(config.get("method", {})),
        train_config=dict(config.get("train", {})),
        classnames=_training_classnames(run_dir, record),
        dataset=key["train_dataset"],
        template=_template(key["train_dataset"]),
        backbone={
            "name": key["backbone"],
            "pretrained": key["pretrained"],
            "weights": key["weights"],
            "activation": key.get("activation", "gelu"),
            "transform": config.get("transform", ""),
        },
        state=dict(state),
        run_id=record.get("id", ""),
        key=dict(key),
        imported=record.get("imported"),
        source=str(run_dir),
    )


# --- .mugcp files --------------------------------------------------------------------------------------------------
def save_mugcp(model: TrainedModel, path: str | Path) -> Path:
    """Write `model` as one self-contained .mugcp file (atomically)."""
    import mugcp_bench
    from mugcp_bench.tensor_files import atomic_torch_save

    payload = {
        "format": MUGCP_FORMAT,
        "version": MUGCP_VERSION,
        "mugcp_bench": mugcp_bench.__version__,
        "method": model.method,
        "variant": model.variant,
        "method_config": model.method_config,
        "train_config": model.train_config,
        "classnames": list(model.classnames),
        "dataset": model.dataset,
        "template": model.template,
        "backbone": dict(model.backbone),
        "run": {"id": model.run_id, "key": dict(model.key), "imported": model.imported},
        "state": {k: v.detach().cpu().contiguous() for k, v in model.state.items()},
    }
    atomic_torch_save(payload, Path(path))
    return Path(path)


def is_mugcp_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).name.endswith(MUGCP_SUFFIX)


def load_mugcp(path: str | Path) -> TrainedModel:
    """Read a .mugcp file (weights-only: plain data and tensors); UserError when it is not one."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable .mugcp file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != MUGCP_FORMAT:
        raise UserError(f"{path} is not a .mugcp file written by 'mugcp-bench export --format mugcp'")
    if payload.get("version") != MUGCP_VERSION:
        raise UserError(f"{path} is .mugcp version {payload.get('version')}; this mugcp-bench reads {MUGCP_VERSION}")
    run = payload.get("run") or {}
    return TrainedModel(
        method=payload["method"],
        variant=payload.get("variant", ""),
        method_config=dict(payload["method_config"]),
        train_config=dict(payload["train_config"]),
        classnames=list(payload.get("classnames", [])),
        dataset=payload.get("dataset", ""),
        template=payload.get("template", "a photo of a {}."),
        backbone=dict(payload["backbone"]),
        state=dict(payload["state"]),
        run_id=run.get("id", ""),
        key=dict(run.get("key") or {}),
        imported=run.get("imported"),
        source=str(path),
    )


def load_trained(run_or_file: str | Path, results_dir: str | Path = "results") -> TrainedModel:
    """A run (id or folder) or a .mugcp file."""
    if is_mugcp_file(run_or_file):
        return load_mugcp(run_or_file)
    path = Path(run_or_file)
    if path.is_file() and not path.name == "run.json":
        raise UserError(
            f"{path} is neither a run nor a .mugcp file; a reference checkpoint is evaluated after "
            "'mugcp-bench import', which records it as a run"
        )
    return from_run(run_or_file, results_dir)


# --- the method and its backbone -----------------------------------------------------------------------------------
_BACKBONES: dict[tuple[str, str, str, str], Any] = {}


def _toy_checkpoints(name: str) -> list[str]:
    """The toy CLIP checkpoints prepared in the cache (a toy-world run records its weights as a file)."""
    from mugcp_bench.paths import default_cache_dir
    from mugcp_bench.toy.pretrain import MODEL_NAME

    if name != MODEL_NAME:
        return []
    return [str(p) for p in sorted((default_cache_dir() / "toy").glob("*/toy_clip.pt"))]


def build_backbone(model: TrainedModel, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32"):
    """The run's frozen backbone, its weights checked against the hash the run recorded.

    `pretrained` overrides the weights source (needed when the run's weights came from a file, which the run key
    records only as "file"; toy-world runs find the prepared toy CLIP themselves)."""
    from mugcp_bench.engine.trainer import backbone_precision
    from mugcp_bench.model.backbone import load_backbone

    info = model.backbone
    name, recorded = info["name"], info.get("pretrained", "random")
    if name == "toy-clip":
        from mugcp_bench.toy.pretrain import register_model_config

        register_model_config()
    candidates = [pretrained] if pretrained else ([recorded] if recorded != "file" else _toy_checkpoints(name))
    if not candidates:
        raise UserError(
            f"{model.label} was trained on {name} weights from a file; pass --pretrained PATH to that file "
            f"(weights hash {info.get('weights')})"
        )
    weights = backbone_precision(precision)
    for source in candidates:
        cache_key = (name, source, str(device), weights)
        backbone = _BACKBONES.get(cache_key)
        if backbone is None:
            backbone = load_backbone(name, source, device=device, precision=weights)
        if not info.get("weights") or backbone.weights_hash.startswith(info["weights"]):
            _BACKBONES[cache_key] = backbone
            if info.get("activation") and backbone.activation != info["activation"]:
                raise UserError(
                    f"{name} / {source} builds {backbone.activation}, {model.label} was trained with "
                    f"{info['activation']}; pass the --backbone it was trained as"
                )
            return backbone
    shown = pretrained or (recorded if recorded != "file" else "the prepared toy CLIP")
    raise UserError(
        f"the weights of {name} / {shown} (hash {backbone.weights_hash[:12]}) are not those {model.label} was "
        f"trained on (hash {info.get('weights')}); pass --pretrained with the run's weights"
    )


def build_method(model: TrainedModel, backbone, classnames=None):
    """The method of `model` on `backbone` (eval mode, on the backbone's device), its trained state loaded."""
    import mugcp_bench.methods  # noqa: F401 - registers the methods
    from mugcp_bench.registry import METHODS

    cls = METHODS.get(model.method)
    cfg = cls.make_config(model.method_config)
    names = list(classnames or model.classnames)
    if not names:  # the class names only size CoOp's class-specific context: take the count from the state
        ctx = model.state.get("ctx")
        names = [f"class {i}" for i in range(ctx.shape[0] if ctx is not None and ctx.dim() == 3 else 1)]
    method = cls(backbone, names, cfg, template=model.template, dataset=model.dataset)
    method.to(backbone.device)
    method.load_trainable_state(model.state, source=model.source or model.label)
    return method.eval()


__all__ = [
    "MUGCP_SUFFIX",
    "TrainedModel",
    "build_backbone",
    "build_method",
    "find_run_dir",
    "from_run",
    "is_mugcp_file",
    "load_mugcp",
    "load_trained",
    "save_mugcp",
]
