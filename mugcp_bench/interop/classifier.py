"""Classify images with a trained prompt: `load_classifier(run_or_file).predict(images, classnames)`.

The same path as evaluation (`mugcp_bench.engine.trainer.evaluate`): the backbone's test transform, the method's
``set_classnames`` / ``begin_eval`` / ``predict`` in batches of the run's evaluation batch size, softmax over the
logits. Any class names work — generalising to names never trained on is what base-to-novel measures; CoOp with a
class-specific context is the exception (it knows only its training classes). Per-image prompts (CoCoOp, MuGCP) are
built per image; DCP's fused prompts depend on the batch, as in the reference, so a batch size other than the run's
gives other numbers. MuGCP describes each image with the run's describer through the shared description cache, or
reads descriptions the caller gives (a JSONL of ``{"image": path, "text": ...}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mugcp_bench.errors import UserError
from mugcp_bench.interop.trained import TrainedModel, build_backbone, build_method, load_trained

ImageInput = Any  # a path, a PIL image, a (3, H, W) tensor, or a sequence / (N, 3, H, W) tensor of them


@dataclass
class Prediction:
    """What `Classifier.predict` returns for N images and C class names."""

    classnames: list[str]
    probs: torch.Tensor  # (N, C) softmax over the class names
    logits: torch.Tensor  # (N, C)
    images: list[str]  # how each image was given (its path, or "<image i>")

    @property
    def indices(self) -> list[int]:
        return self.probs.argmax(-1).tolist()

    @property
    def labels(self) -> list[str]:
        """The top-1 class name of every image."""
        return [self.classnames[i] for i in self.indices]

    def top(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) of every image, best first."""
        k = max(1, min(k, len(self.classnames)))
        values, idx = self.probs.topk(k, dim=-1)
        return [
            [(self.classnames[j], float(p)) for j, p in zip(row_i.tolist(), row_p.tolist())]
            for row_i, row_p in zip(idx, values)
        ]


def parse_classnames(classes: str | Sequence[str]) -> list[str]:
    """Class names from "cat,dog,sea or lake", from "@file.txt" (one per line), or a list; UserError when empty."""
    if isinstance(classes, str):
        text = classes.strip()
        if text.startswith("@"):
            path = Path(text[1:]).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise UserError(f"class file {path} cannot be read ({e.strerror or e}); pass --classes @FILE") from None
            names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            names = [part.strip() for part in text.split(",") if part.strip()]
    else:
        names = [str(c).strip() for c in classes if str(c).strip()]
    if not names:
        raise UserError('give at least one class name: --classes "cat,dog" or --classes @classes.txt (one per line)')
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"class name '{dup[0]}' is given twice; every class name must be distinct")
    return names


def _image_list(images: ImageInput) -> list[Any]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise UserError(f"an image tensor must be (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
        return [images]
    out = list(images)
    if not out:
        raise UserError("give at least one image (a path, a PIL image or a tensor)")
    return out


def _read(path: str | os.PathLike[str]):
    from mugcp_bench.datasets.base import IMAGE_ERRORS, read_rgb

    try:
        return read_rgb(path)
    except IMAGE_ERRORS as e:
        reason = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__})"
        raise UserError(f"image {path} is {reason}; pass image files PIL can open (JPEG, PNG, ...)") from None


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N, or auto (cuda when available); UserError for anything else or a missing GPU."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device '{name}': use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}': use cpu, cuda, cuda:N or auto") from None


class Classifier:
    """A trained method ready to classify images into any class names (see the module docstring)."""

    def __init__(
        self,
        model: TrainedModel,
        pretrained: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int | None = None,
    ) -> None:
        from mugcp_bench.engine.trainer import prepare_method, resolve_precision

        self.model = model
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.backbone = build_backbone(model, pretrained, str(self.device), self.precision)
        self.method = prepare_method(build_method(model, self.backbone), self.device, self.precision)
        self.method.eval()
        self.batch_size = int(batch_size or model.eval_batch_size)
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        from mugcp_bench.methods.base import Method

        self.needs_files = type(self.method).prepare_images is not Method.prepare_images  # MuGCP: descriptions
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def transform(self):
        """The backbone's test transform (PIL image -> tensor): what a tensor given to `predict` must have had."""
        return self.backbone.test_transform

    @property
    def name(self) -> str:
        return self.model.label

    def _files_for(self, items: list[Any]) -> list[str]:
        """Image files (for describers and keys): paths as given, PIL images written as PNG into a temp folder."""
        out = []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                out.append(os.path.abspath(os.fspath(item)))
            elif isinstance(item, torch.Tensor):
                raise UserError(
                    f"{self.model.method} describes every image from its file: pass image paths or PIL images, not "
                    "tensors"
                )
            else:
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="mugcp-predict-")
                png = Path(self._tmp.name) / f"image-{i}.png"
                item.save(png)
                out.append(str(png))
        return out

    def _tensor(self, item: Any) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        image = _read(item) if isinstance(item, (str, os.PathLike)) else item.convert("RGB")
        return self.transform(image)

    @torch.no_grad()
    def logits(
        self, images: ImageInput, classnames: str | Sequence[str], template: str | None = None
    ) -> tuple[torch.Tensor, list[str], list[str]]:
        """(logits (N, C), the class names, a name per image), computed as evaluation computes them."""
        from mugcp_bench.model.backbone import autocast

        names = parse_classnames(classnames)
        items = _image_list(images)
        shown = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<image {i}>" for i, x in enumerate(items)]
        tensors = [self._tensor(x) for x in items]  # every image read (and refused) before any work
        keys = None
        method = self.method
        method.set_classnames(names, template=template or self.model.template, dataset=self.model.dataset)
        if self.needs_files:
            keys = self._files_for(items)
            try:
                method.prepare_images(keys, "test")
            except UserError as e:
                raise UserError(
                    f"{e}; or give the descriptions yourself: --descriptions FILE.jsonl with one "
                    '{"image": path, "text": ...} per line (Python: load_classifier(..., descriptions=...))'
                ) from None
        out = []
        with autocast(self.device, self.precision):
            method.begin_eval()
        try:
            for start in range(0, len(tensors), self.batch_size):
                batch = torch.stack(tensors[start : start + self.batch_size]).to(self.device)
                batch_keys = keys[start : start + self.batch_size] if keys is not None else None
                with autocast(self.device, self.precision):
                    out.append(method.predict(batch, batch_keys).float().cpu())  # (B, C)
        finally:
            method.end_eval()
        return torch.cat(out), names, shown

    def predict(self, images: ImageInput, classnames: str | Sequence[str], template: str | None = None) -> Prediction:
        """Labels and probabilities of `images` (paths, PIL images, or tensors made with `transform`) among
        `classnames` (a list, "a,b,c" or "@file.txt")."""
        logits, names, shown = self.logits(images, classnames, template)
        return Prediction(names, logits.softmax(-1), logits, shown)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _descriptions_file(descriptions: str | os.PathLike[str] | Mapping[str, str]) -> str:
    """A JSONL path for the `file` describer: the given file, or one written from a {image path: text} mapping."""
    if isinstance(descriptions, Mapping):
        lines = [json.dumps({"image": os.path.abspath(k), "text": str(v)}) for k, v in descriptions.items()]
        text = "\n".join(lines) + "\n"
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"mugcp-predict-descriptions-{digest}.jsonl"
        path.write_text(text, encoding="utf-8")
        return str(path)
    path = Path(descriptions)
    if not path.is_file():
        raise UserError(f'description file {path} does not exist; pass a JSONL of {{"image": path, "text": ...}}')
    return str(path)


def load_classifier(
    run_or_file: str | os.PathLike[str],
    results_dir: str | os.PathLike[str] = "results",
    *,
    pretrained: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int | None = None,
    descriptions: str | os.PathLike[str] | Mapping[str, str] | None = None,
) -> Classifier:
    """The classifier of a trained run (its id or folder, looked up in `results_dir`) or of a .mugcp file.

        clf = load_classifier("3f2a9c1e")
        out = clf.predict(["cat.jpg", "lake.png"], ["cat", "dog", "sea or lake"])
        out.labels, out.probs

    pretrained: the backbone weights when the run's came from a file (checked against the recorded hash).
    descriptions (MuGCP): a JSONL of {"image": path, "text": ...} or a {path: text} mapping, used instead of the
    run's describer."""
    model = load_trained(run_or_file, results_dir)
    if descriptions is not None:
        if "describer" not in model.method_config:
            raise UserError(f"{model.method} uses no image descriptions; drop --descriptions")
        cfg = {**model.method_config, "describer": "file", "describer_file": _descriptions_file(descriptions)}
        model = replace(model, method_config={**cfg, "prompt_id": ""})
    return Classifier(model, pretrained=pretrained, device=device, precision=precision, batch_size=batch_size)


__all__ = ["Classifier", "Prediction", "load_classifier", "parse_classnames"]
