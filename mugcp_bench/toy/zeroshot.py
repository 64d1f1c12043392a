"""Zero-shot accuracy of a CLIP model on toy datasets (one hand-written template per dataset), read through the
datasets layer exactly as the benchmark reads them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import open_clip
import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    data_root: Path,
    names: Iterable[str],
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 accuracy (%) on the test split of each named dataset with its single template."""
    from mugcp_bench.datasets.base import ImageListDataset, get_spec

    model.eval()
    out: dict[str, float] = {}
    for name in names:
        spec = get_spec(name)
        data = spec.load(Path(data_root))
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
        out[name] = round(100.0 * correct / total, 2)
        log.info("zero-shot %s: %.2f%% (%d classes, %d images)", name, out[name], len(prompts), total)
    return out


def evaluate_checkpoint(model_name: str, checkpoint: Path, data_root: Path, names: Iterable[str]) -> dict[str, float]:
    """Load an open_clip checkpoint the way the benchmark does and measure zero-shot accuracy."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name)
    return zero_shot_accuracy(model, preprocess, tokenizer, data_root, names)


__all__ = ["evaluate_checkpoint", "zero_shot_accuracy"]
