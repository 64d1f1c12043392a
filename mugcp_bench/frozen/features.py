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
from filelock import FileLock
from torch.utils.data import DataLoader

from mugcp_bench.datasets.base import Datum, ImageListDataset
from mugcp_bench.model.backbone import Backbone, autocast
from mugcp_bench.tensor_files import atomic_torch_save

log = logging.getLogger(__name__)


def features_key(backbone: Backbone, items: Sequence[Datum], precision: str) -> str:
    h = hashlib.sha1()
    h.update(f"{backbone.weights_hash}|{backbone.transform_version}|{backbone.image_size}|{precision}".encode())
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
    """Frozen image features (N, E), unnormalised, from the cache or computed (and cached).

    Workers that need the same features at once build them once: the build runs under a file lock next to the
    cache entry, and whoever waited on the lock reads the entry the first one wrote."""
    if cache_dir is None:
        return _compute(backbone, items, transform, device, precision, batch_size, dataset, workers)
    path = Path(cache_dir) / "features" / f"{features_key(backbone, items, precision)}.pt"
    feats = _cached(path, len(items))
    if feats is not None:
        return feats
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        feats = _cached(path, len(items))  # built by another worker while this one waited
        if feats is None:
            feats = _compute(backbone, items, transform, device, precision, batch_size, dataset, workers)
            atomic_torch_save(feats, path)
    return feats


def _cached(path: Path, n: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
        if feats.shape[0] == n:
            log.debug("image features from cache %s", path)
            return feats
    except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed
        log.warning("ignoring damaged feature cache %s (%s)", path, e)
    return None


@torch.no_grad()
def _compute(
    backbone: Backbone,
    items: Sequence[Datum],
    transform: Callable,
    device: torch.device,
    precision: str,
    batch_size: int,
    dataset: str,
    workers: int,
) -> torch.Tensor:
    log.debug("computing image features of %d images", len(items))
    loader = DataLoader(ImageListDataset(items, transform, dataset), batch_size=batch_size, num_workers=workers)
    out = []
    for images, _, _ in loader:
        with autocast(device, precision):
            out.append(backbone.encode_image(images.to(device)).float().cpu())  # (b, E)
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)
