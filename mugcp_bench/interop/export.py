"""`export`: a trained run as the checkpoint its reference code's ``load_model`` reads, or as a .mugcp file.

The reference file (notes/checkpoints README §9): ``<DIR>/<learner>/model.pth.tar-<E>`` + ``checkpoint``, a dict
with ``state_dict`` (our tensors under the reference's names in its precision regime, the class buffers of the
training classes, and — whole-model trainers — the frozen CLIP from our backbone), ``epoch`` E, ``optimizer`` and
``scheduler`` None and ``val_result`` None. It is meant for ``train.py --eval-only --model-dir DIR --load-epoch E``,
not for resuming training (Dassl's resume would call ``load_state_dict`` on the None optimizer). The reference loads
``strict=False`` and would silently ignore most setting mismatches, so the exact options are printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mugcp_bench.errors import UserError
from mugcp_bench.interop.formats import ReferenceFormat, formats_of
from mugcp_bench.interop.reference import REGIMES, to_reference, write_reference_file
from mugcp_bench.interop.trained import TrainedModel, build_backbone, build_method
from mugcp_bench.protocols import training_regime

# Our dataset names whose reference config file (configs/datasets/<name>.yaml) is spelled otherwise.
REFERENCE_DATASET_FILES = {"imagenet_v2": "imagenetv2"}
# Backbones the reference code can build (OpenAI's CLIP through clip.load): our open_clip names -> MODEL.BACKBONE.NAME.
REFERENCE_BACKBONES = {
    "ViT-B-16": "ViT-B/16",
    "ViT-B-32": "ViT-B/32",
    "ViT-L-14": "ViT-L/14",
    "ViT-L-14-336": "ViT-L/14@336px",
}


@dataclass
class ExportResult:
    path: Path
    epoch: int
    format: ReferenceFormat
    command: str  # the reference evaluation command to run
    notes: list[str] = field(default_factory=list)  # what the user must know (printed before the command)
    n_tensors: int = 0


def _method_class(name: str) -> type:
    import mugcp_bench.methods  # noqa: F401
    from mugcp_bench.registry import METHODS

    return METHODS.get(name)


def reference_format_for(model: TrainedModel) -> ReferenceFormat:
    """The reference format of `model`'s method and settings; UserError when it has none or they do not fit."""
    cls = _method_class(model.method)
    formats = formats_of(cls)
    if not formats:
        why = "a reconstruction with no reference code" if getattr(cls, "reconstructed", False) else "no mapping"
        raise UserError(
            f"{model.method} has {why} to a reference checkpoint; use --format mugcp"
            + ("" if getattr(cls, "reconstructed", False) else " (methods declare one as `reference_checkpoint`)")
        )
    cfg = cls.make_config(model.method_config)
    problems = []
    for fmt in formats:
        problem = fmt.unrepresentable(cfg)
        if problem is None:
            return fmt
        problems.append(problem)
    raise UserError(f"{model.label} cannot be written as a reference checkpoint: {problems[0]}; use --format mugcp")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return f'"{v}"' if (not v or any(c.isspace() for c in v)) else v
    return str(v)


def reference_command(fmt: ReferenceFormat, model: TrainedModel, model_dir: Path, epoch: int, regime: str) -> str:
    """The reference repository's evaluation command for an exported file (run from the repository's root)."""
    cls = _method_class(model.method)
    cfg = cls.make_config(model.method_config)
    key = model.key
    protocol = key.get("train_protocol", "base2novel")
    dataset = REFERENCE_DATASET_FILES.get(model.dataset, model.dataset)
    provenance = getattr(cls, "provenance", {}).get(key.get("recipe", "paper")) or getattr(cls, "provenance", {}).get(
        "paper"
    )
    config_file = (
        fmt.configs.get(protocol)
        or (provenance.configs.get(protocol) if provenance is not None else None)
        or next(iter(fmt.configs.values()), "configs/trainers/<config>.yaml")
    )
    seed = key.get("seed", 1)
    parts = [
        "python train.py --root DATA",
        f"--seed {seed}",
        f"--trainer {fmt.trainer}",
        f"--dataset-config-file configs/datasets/{dataset}.yaml",
        f"--config-file {config_file}",
        f"--output-dir output/mugcp_export/{model.dataset}/seed{seed}",
        f"--model-dir {model_dir}",
        f"--load-epoch {epoch}",
        "--eval-only",
    ]
    for name, keys in fmt.options.items():
        for yacs in (keys,) if isinstance(keys, str) else keys:
            parts.append(f"{yacs} {_value(getattr(cfg, name))}")
    for yacs, value in fmt.fixed_options.items():
        parts.append(f"{yacs} {_value(value)}")
    yacs_keys = [k for v in fmt.options.values() for k in ((v,) if isinstance(v, str) else v)]
    if yacs_keys:
        prefix = ".".join(yacs_keys[0].split(".")[:2])
        parts.append(f"{prefix}.PREC {regime}")
    backbone = REFERENCE_BACKBONES.get(model.backbone.get("name", ""), model.backbone.get("name", ""))
    parts.append(f"MODEL.BACKBONE.NAME {backbone}")
    parts.append(f"DATASET.NUM_SHOTS {key.get('shots', 16)}")
    if "novel" in training_regime(protocol).eval_classes:
        parts.append("DATASET.SUBSAMPLE_CLASSES new")  # the novel half; `base` for the training classes
    return " \\\n    ".join(parts)


def export_reference(
    model: TrainedModel,
    model_dir: str | Path,
    epoch: int | None = None,
    regime: str = "fp16",
    frozen: bool = True,
    pretrained: str | None = None,
) -> ExportResult:
    """Write `model` as its reference trainer's checkpoint under `model_dir` (the reference's --model-dir)."""
    if regime not in REGIMES:
        raise UserError(f"unknown reference precision '{regime}'; use one of {', '.join(REGIMES)}")
    fmt = reference_format_for(model)
    epoch = int(epoch if epoch is not None else model.train_config.get("epochs") or 1)
    if epoch < 1:
        raise UserError(f"--epoch must be at least 1 (Dassl numbers epochs from 1), got {epoch}")
    backbone = build_backbone(model, pretrained)
    method = build_method(model, backbone)
    rules = fmt.rules
    from mugcp_bench.interop.keys import first_to_reference

    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    state = {
        k: v
        for k, v in method.state_dict().items()
        if k in trainable or (frozen and first_to_reference(rules, k, backbone.vision_layers) is not None)
    }
    notes: list[str] = []
    if not model.classnames:
        notes.append(
            "the run's training class names are unknown: the file has no class buffers (load_model deletes them)"
        )
    sd = to_reference(fmt, method, state, model.classnames, regime, frozen)
    path = write_reference_file(model_dir, fmt, sd, epoch)
    name = model.backbone.get("name", "")
    if name not in REFERENCE_BACKBONES:
        notes.append(
            f"the reference code builds OpenAI CLIP only ({', '.join(REFERENCE_BACKBONES.values())}); a file for "
            f"backbone '{name}' does not load into it"
        )
    elif model.backbone.get("pretrained") not in ("openai",):
        notes.append(f"the reference code loads OpenAI's weights; this run used '{model.backbone.get('pretrained')}'")
    if fmt.note:
        notes.append(fmt.note)
    notes.append(
        "for --eval-only only: Dassl's resume would call load_state_dict on the optimizer and scheduler, which are None"
    )
    command = reference_command(fmt, model, Path(model_dir), epoch, regime)
    return ExportResult(path, epoch, fmt, command, notes, len(sd))


def export_mugcp(model: TrainedModel, out: str | Path) -> Path:
    """Write `model` as one .mugcp file; `out` a file path, or an existing folder (named after the run)."""
    from mugcp_bench.interop.trained import MUGCP_SUFFIX, save_mugcp

    out = Path(out)
    if out.is_dir():
        stem = f"{model.method}{'-' + model.variant if model.variant else ''}-{model.dataset}"
        out = out / f"{stem}-{model.run_id or 'model'}{MUGCP_SUFFIX}"
    elif not out.name.endswith(MUGCP_SUFFIX):
        out = out.with_name(out.name + MUGCP_SUFFIX)
    return save_mugcp(model, out)


__all__ = ["ExportResult", "export_mugcp", "export_reference", "reference_command", "reference_format_for"]
