"""Zero-shot accuracy of a CLIP model on toy datasets (one hand-written template per dataset), read through the
datasets layer exactly as the benchmark reads them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import open_clip
import torch

from mugcp_bench.console import Progress

log = logging.getLogger(__name__)


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    data_root: Path,
    names: Iterable[str],
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy (%) on the test split of each named dataset with its single template."""
    model.eval()
    names = list(names)
    out: dict[str, float] = {}
    with Progress("zero-shot toy CLIP", total=len(names), unit="datasets", enabled=progress) as bar:
        for name in names:
            out[name] = _accuracy(model, preprocess, tokenizer, Path(data_root), name, batch_size)
            bar.advance(1, status=f"{name} {out[name]:.1f}%")
    return out


def _accuracy(
    model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, data_root: Path, name: str, batch_size: int
) -> float:
    from mugcp_bench.datasets.base import ImageListDataset, get_spec

    spec = get_spec(name)
    data = spec.load(data_root)
    prompts = [spec.template.format(c.replace("_", " ")) for c in data.classnames]
    text = model.encode_text(tokenizer(prompts), normalize=True)  # (C, D)
    loader = torch.utils.data.DataLoader(
        ImageListDataset(data.test, preprocess, dataset=name), batch_size=batch_size, shuffle=False
    )
    correct = total = 0
    for images, labels, _ in loader:
        feats = model.encode_image(images, normalize=True)  # (B, D)
        correct += int(((feats @ text.T).argmax(dim=1) == labels).sum())
        total += len(labels)
    accuracy = round(100.0 * correct / total, 2)
    log.info("zero-shot %s: %.2f%% (%d classes, %d images)", name, accuracy, len(prompts), total)
    return accuracy


def evaluate_checkpoint(
    model_name: str, checkpoint: Path, data_root: Path, names: Iterable[str], progress: bool = False
) -> dict[str, float]:
    """Load an open_clip checkpoint the way the benchmark does and measure zero-shot accuracy."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name)
    return zero_shot_accuracy(model, preprocess, tokenizer, data_root, names, progress=progress)


__all__ = ["evaluate_checkpoint", "zero_shot_accuracy"]
