"""On-disk cache of frozen image features for evaluation (zero-shot, CoOp, CoCoOp: no prompt in the vision tower).

Content-keyed by the backbone weights, the test transform, the precision and the exact image list (paths, labels,
file sizes and modification times), written
atomically, so every run of a sweep (and every executor process) can share it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mugcp_bench.atomic import atomic_torch_save
from mugcp_bench.backbone import TRANSFORM_VERSION, Backbone
from mugcp_bench.datasets.base import Datum, ImageListDataset
from mugcp_bench.trainer import autocast

log = logging.getLogger(__name__)


def features_key(backbone: Backbone, items: Sequence[Datum], precision: str) -> str:
    h = hashlib.sha1()
    h.update(f"{backbone.weights_hash}|{TRANSFORM_VERSION}|{backbone.image_size}|{precision}".encode())
    for d in items:  # size and mtime: a replaced or damaged image invalidates the entry
        try:
            st = os.stat(d.impath)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{d.relpath}\t{d.label}\t{stamp}\n".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def image_features(
    backbone: Backbone,
    items: Sequence[Datum],
    transform: Callable,
    device: torch.device,
    precision: str,
    cache_dir: Path | None,
    batch_size: int = 100,
    dataset: str = "",
    workers: int = 0,
) -> torch.Tensor:
    """Frozen image features (N, E), unnormalised, from the cache or computed (and cached)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "features" / f"{features_key(backbone, items, precision)}.pt"
        if path.is_file():
            try:
                feats = torch.load(path, map_location="cpu", weights_only=True)
                if feats.shape[0] == len(items):
                    log.debug("image features from cache %s", path)
                    return feats
            except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed
                log.warning("ignoring damaged feature cache %s (%s)", path, e)
    loader = DataLoader(ImageListDataset(items, transform, dataset), batch_size=batch_size, num_workers=workers)
    out = []
    for images, _, _ in loader:
        with autocast(device, precision):
            out.append(backbone.encode_image(images.to(device)).float().cpu())  # (b, E)
    feats = torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)
    if path is not None:
        atomic_torch_save(feats, path)
    return feats
