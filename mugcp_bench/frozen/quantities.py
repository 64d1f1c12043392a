"""Quantities of the frozen CLIP that several methods need, computed once and cached by content.

* `class_text_features` — hand-crafted class text features of a template list (KgCoOp's and TCP's knowledge
  features, PromptSRC's 60-template teacher), (C, E).
* `frozen_image_features` — unprompted image features of a list of images under a deterministic transform (the
  evaluation feature cache of `frozen.features`, with an in-process layer on top), (N, E).
* `frozen_batch_features` — unprompted features of one (augmented) training batch; nothing to cache there: every
  step sees new random crops, so methods that need a frozen image pass in training (PromptSRC's teacher) run it per
  step, as the reference code does.

Keys follow `frozen.features`' rules: the backbone's weights hash, the weight dtype and device type, the text-path
switches that change rounding (EOT truncation, fused attention), and the exact inputs (class names, templates,
reduction). Entries live in a per-process LRU and, with a `cache_dir` (or `use_cache_dir`), in
``<cache_dir>/frozen/text-<key>.pt``, written atomically under a file lock so parallel workers build each once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock

from mugcp_bench.datasets.base import Datum
from mugcp_bench.frozen import features
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.tensor_files import atomic_torch_save

log = logging.getLogger(__name__)

AVERAGES = ("unnormalised-mean", "normalised-mean")
_MEMORY: OrderedDict[str, torch.Tensor] = OrderedDict()
_MEMORY_ENTRIES = 64
_cache_dir: Path | None = None


@contextlib.contextmanager
def use_cache_dir(path: str | Path | None) -> Iterator[None]:
    """Within the block, calls without an explicit `cache_dir` also use the on-disk cache under `path`."""
    global _cache_dir
    before, _cache_dir = _cache_dir, (Path(path) if path is not None else None)
    try:
        yield
    finally:
        _cache_dir = before


def clear_memory() -> None:
    """Forget the in-process entries (tests; the disk cache stays)."""
    _MEMORY.clear()


def _remember(key: str, value: torch.Tensor) -> torch.Tensor:
    _MEMORY[key] = value
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return value


def _backbone_key(backbone: Backbone) -> str:
    return (
        f"{backbone.weights_hash}|{backbone.dtype}|{backbone.device.type}|"
        f"eot{int(backbone.eot_truncation)}|fused{int(backbone.fused_attention)}"
    )


def text_features_key(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], average: str, normalize: bool, fp32: bool
) -> str:
    """Content key of one `class_text_features` entry."""
    h = hashlib.sha1()
    h.update(f"{_backbone_key(backbone)}|{average}|norm{int(normalize)}|fp32{int(fp32)}\n".encode())
    for t in templates:
        h.update(f"T\t{t}\n".encode())
    for c in classnames:
        h.update(f"C\t{c}\n".encode())
    return h.hexdigest()[:20]


def _fp32_twin(backbone: Backbone) -> Backbone:
    """An fp32 copy of a backbone holding fp16 weights (the reference's `clip_model.float()` of fp16 CLIP weights)."""
    twin = Backbone(
        copy.deepcopy(backbone.model).float(),
        backbone.name,
        backbone.pretrained,
        backbone.tokenizer,
        backbone.preprocess,
    )
    twin.eot_truncation, twin.fused_attention = backbone.eot_truncation, backbone.fused_attention
    return twin


@torch.no_grad()
def _compute_text(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], average: str, normalize: bool
) -> torch.Tensor:
    names = [c.replace("_", " ") for c in classnames]
    total = None
    for template in templates:
        f = backbone.text_features([template.format(n) for n in names], normalize=False).float()  # (C, E)
        if average == "normalised-mean":
            f = F.normalize(f, dim=-1)
        total = f if total is None else total + f
    mean = total / len(templates)  # (C, E)
    return F.normalize(mean, dim=-1) if normalize else mean


def class_text_features(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: str | Sequence[str],
    *,
    average: str = "unnormalised-mean",
    normalize: bool = True,
    fp32: bool = False,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """Frozen class text features (C, E), fp32, on the backbone's device; never part of an autograd graph.

    Every template (a format string with one ``{}``) is filled with every class name (underscores read as spaces,
    as every reference does) and encoded by the frozen text tower without prompts.

    - ``average="unnormalised-mean"``: the mean over templates of the *unnormalised* features (PromptSRC's teacher,
      muzairkhattak/PromptSRC trainers/promptsrc.py); ``"normalised-mean"``: the mean of L2-normalised features
      (CLIP's zero-shot ensembles). With one template both are that template's features.
    - ``normalize``: L2-normalise the result (default); False returns the mean as it is.
    - ``fp32``: when the backbone holds fp16 weights (``--precision reference-fp16``), encode with an fp32 copy of
      them, as PromptSRC's teacher does (``load_clip_to_cpu(cfg).float()``); KgCoOp and TCP encode with their fp16
      CLIP (leave False). No effect on an fp32 backbone.
    - ``cache_dir``: also keep the entry on disk (default: the directory of an enclosing `use_cache_dir`, else only
      in memory).
    """
    if isinstance(templates, str):
        templates = [templates]
    templates, classnames = list(templates), list(classnames)
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError("templates must be a non-empty list of format strings with exactly one '{}' each")
    upcast = fp32 and backbone.dtype != torch.float32
    key = text_features_key(backbone, classnames, templates, average, normalize, upcast)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key].to(backbone.device, copy=True)

    def compute() -> torch.Tensor:
        model = _fp32_twin(backbone) if upcast else backbone
        return _compute_text(model, classnames, templates, average, normalize).cpu()

    folder = Path(cache_dir) if cache_dir is not None else _cache_dir
    if folder is None:
        value = compute()
    else:
        value = _on_disk(folder / "frozen" / f"text-{key}.pt", (len(classnames), backbone.embed_dim), compute)
    return _remember(key, value).to(backbone.device, copy=True)  # a copy: callers may modify theirs


def _load(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
        if tuple(value.shape) == shape:
            return value
    except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed
        log.warning("ignoring damaged frozen-feature cache %s (%s)", path, e)
    return None


def _on_disk(path: Path, shape: tuple[int, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    value = _load(path, shape)
    if value is not None:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        value = _load(path, shape)  # built by another worker while this one waited
        if value is None:
            value = compute()
            atomic_torch_save(value, path)
    return value


def frozen_image_features(
    backbone: Backbone,
    items: Sequence[Datum],
    transform: Callable,
    device: torch.device,
    precision: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 100,
    dataset: str = "",
    workers: int = 0,
) -> torch.Tensor:
    """Unprompted image features (N, E), fp32 on the CPU, of `items` under a *deterministic* `transform` (the test
    transform): `frozen.features.image_features` (same key: weights, transform version, precision, image list with
    sizes and modification times) plus an in-process layer, so every method of a process reads them once. The
    tensor is shared with the cache: do not modify it in place."""
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir
    key = f"img|{features.features_key(backbone, items, precision)}|{backbone.device.type}"
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    value = features.image_features(backbone, items, transform, device, precision, folder, batch_size, dataset, workers)
    return _remember(key, value)


@torch.no_grad()
def frozen_batch_features(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Unprompted image features (B, E) of one batch, unnormalised, without a graph (per training step)."""
    return backbone.encode_image(images)  # (B, E)


__all__ = [
    "AVERAGES",
    "class_text_features",
    "clear_memory",
    "frozen_batch_features",
    "frozen_image_features",
    "text_features_key",
    "use_cache_dir",
]
