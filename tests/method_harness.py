"""Build any registered method generically on the tiny backbone, with real tiny images (shared by method tests).

Import from a test module with ``from tests.method_harness import ...``. The backbone here is cached per process
(an lru_cache, usable outside fixtures); conftest's ``tiny_backbone`` fixture is a separate instance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mugcp_bench.datasets.base import Datum
from mugcp_bench.methods.base import Method, split_overrides
from mugcp_bench.model.backbone import Backbone, load_backbone
from mugcp_bench.registry import METHODS

CLASSNAMES = ("red circle", "blue square", "green_triangle", "yellow star", "purple heart")
OTHER_CLASSNAMES = ("orange cross", "pink circle", "brown square")
TEMPLATE = "a photo of a {}."
DATASET = "x"  # a dataset name no recipe treats specially


@functools.cache
def shared_tiny_backbone() -> Backbone:
    """The tiny random CLIP (4+4 layers, 32 px), built once per test session; tests must never change it."""
    return load_backbone("tiny")


@functools.cache
def vit_b16_backbone() -> Backbone:
    """Randomly initialised ViT-B-16 (for parameter counts only)."""
    return load_backbone("ViT-B-16")


def method_config(name: str, recipe: str = "toy", protocol: str = "base2novel", shots: int = 16, **overrides: Any):
    """The method's Config from a recipe (method keys only; training keys dropped) plus `overrides`."""
    cls = METHODS.get(name)
    cfg_keys, _train_keys = split_overrides(cls, cls.recipe(recipe, protocol, shots, DATASET))
    cfg_keys.update(overrides)
    return cls.make_config(cfg_keys)


def build_method(
    name: str,
    backbone: Backbone | None = None,
    classnames: Sequence[str] = CLASSNAMES,
    seed: int = 0,
    recipe: str = "toy",
    protocol: str = "base2novel",
    **overrides: Any,
) -> Method:
    """A method instance in eval mode, its parameters drawn from `seed`."""
    backbone = backbone or shared_tiny_backbone()
    cls = METHODS.get(name)
    cfg = method_config(name, recipe, protocol, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = cls(backbone, list(classnames), cfg, template=TEMPLATE, dataset=DATASET)
    return method.eval()


def write_items(folder: Path, classnames: Sequence[str], n: int, seed: int = 0, size: int = 32) -> list[Datum]:
    """`n` random RGB PNGs under `folder` (CoOp layout), labelled round-robin over `classnames`."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % len(classnames)
        rel = f"{DATASET}/images/class{label}/img_{seed}_{i}.png"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        items.append(Datum(impath=str(path), label=label, classname=classnames[label], relpath=rel))
    return items


def load_images(items: Sequence[Datum], backbone: Backbone) -> torch.Tensor:
    """(N, 3, H, W) with the backbone's test transform."""
    return torch.stack([backbone.test_transform(Image.open(d.impath).convert("RGB")) for d in items])


@dataclass
class Batch:
    items: list[Datum]
    images: torch.Tensor  # (B, 3, H, W)
    keys: list[str]
    labels: torch.Tensor  # (B,)


def make_batch(folder: Path, backbone: Backbone | None = None, n: int = 3, seed: int = 0) -> Batch:
    backbone = backbone or shared_tiny_backbone()
    items = write_items(folder, CLASSNAMES, n, seed)
    return Batch(
        items, load_images(items, backbone), [d.relpath for d in items], torch.tensor([d.label for d in items])
    )


def prepare(method: Method, batch: Batch, split: str = "train") -> Method:
    """Give the method its per-image side data (MuGCP describes the images) before a forward."""
    method.prepare_images(batch.items, split)
    return method


def total_loss(method: Method, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, cross-entropy + every extra loss), as the trainer computes it (labels passed where the method asks for
    them, the cross-entropy weighted by `ce_weight`)."""
    labels = {"labels": batch.labels} if method.needs_labels and method.training else {}
    out = method(batch.images, keys=batch.keys, **labels)
    loss = out.ce_weight * torch.nn.functional.cross_entropy(out.logits, batch.labels)
    for value in out.losses.values():
        loss = loss + value
    return out.logits, loss
