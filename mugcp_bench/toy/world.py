"""The toy world, prepared once and cached: rendered datasets + a pretrained toy CLIP + its zero-shot accuracies.

Layout under `<cache_dir>/toy/<key>/` (the key hashes the model config, the pretraining settings, the suite sizes and
definitions and the renderer version):

    data/              the rendered suite in CoOp layout (the data root to pass to the datasets layer)
    toy_clip.pt        open_clip state dict: open_clip.create_model("toy-clip", pretrained=<path>)
    world.json         settings, timings and zero-shot accuracy per dataset

Every piece is written atomically (temp folder + rename, temp file + os.replace) under a file lock, so an
interrupted or concurrent prepare restarts cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from filelock import FileLock

from mugcp_bench.atomic import atomic_write_text, default_mode
from mugcp_bench.console import Progress
from mugcp_bench.tensor_files import atomic_torch_save
from mugcp_bench.toy.pretrain import CONFIG_PATH, MODEL_NAME, PretrainSettings, pretrain, register_model_config
from mugcp_bench.toy.render import RENDERER_VERSION
from mugcp_bench.toy.suite import DATASETS, FULL_SIZES, QUICK_SIZES, TOY_SUITE, SuiteSizes, count_images, write_suite
from mugcp_bench.toy.workers import default_workers
from mugcp_bench.toy.zeroshot import evaluate_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "toy_clip.pt"
WORLD_FILE = "world.json"
QUICK_PRETRAIN = PretrainSettings(steps=12, batch_size=64, warmup_steps=2)


@dataclass(frozen=True)
class WorldSettings:
    """What a toy world is made of; its hash is the cache key."""

    sizes: SuiteSizes = FULL_SIZES
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    seed: int = 0  # rendering seed of the suite

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(CONFIG_PATH.read_bytes())
        h.update(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(RENDERER_VERSION.encode())
        h.update(repr(sorted(DATASETS.items())).encode())
        return h.hexdigest()[:16]


@dataclass
class ToyWorld:
    """A prepared toy world: pass `data_root` as the data root and (`backbone_name`, `checkpoint`) to open_clip."""

    data_root: Path
    checkpoint: Path
    backbone_name: str = MODEL_NAME
    suite: dict = field(default_factory=lambda: dict(TOY_SUITE))
    zero_shot: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # settings, timings, versions (world.json)

    @property
    def root(self) -> Path:
        return self.checkpoint.parent


def world_settings(steps: int | None = None, quick: bool = False) -> WorldSettings:
    """Default (or quick: tiny, for tests and CI) settings, with an optional step count override."""
    settings = WorldSettings(sizes=QUICK_SIZES, pretrain=QUICK_PRETRAIN) if quick else WorldSettings()
    if steps is not None:
        if steps < 1:
            raise ValueError("steps must be >= 1")
        settings = replace(settings, pretrain=replace(settings.pretrain, steps=steps))
    return settings


def _render(data_dir: Path, settings: WorldSettings, progress: bool, workers: int) -> float:
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".data.tmp-", dir=data_dir.parent))
    try:
        with Progress(
            "rendering toy suite", total=count_images(settings.sizes), unit="images", enabled=progress
        ) as bar:
            write_suite(tmp, settings.sizes, settings.seed, advance=bar.advance, workers=workers)
        os.chmod(tmp, default_mode(directory=True))
        os.rename(tmp, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - t0


def ensure_toy_world(
    cache_dir: Path | str | None = None,
    steps: int | None = None,
    quick: bool = False,
    force: bool = False,
    progress: bool = True,
) -> ToyWorld:
    """Render the toy suite and pretrain the toy CLIP if not cached yet; return the world.

    cache_dir: cache root (default: $MUGCP_CACHE, else ~/.cache/mugcp-bench); the world lives in <cache_dir>/toy/<key>/.
    steps: pretraining steps (changes the key). quick: a tiny world (< 30 s) of the same structure, for tests and CI.
    force: discard a cached world with the same key and prepare it again.
    """
    if cache_dir is None:
        from mugcp_bench.paths import default_cache_dir

        cache_dir = default_cache_dir()
    settings = world_settings(steps, quick)
    root = Path(cache_dir) / "toy" / settings.key()
    root.mkdir(parents=True, exist_ok=True)
    register_model_config()
    data_dir, ckpt, world_file = root / "data", root / CHECKPOINT_NAME, root / WORLD_FILE
    with FileLock(str(root) + ".lock"):
        for stale in root.glob(".*.tmp*"):  # temp files and folders of an interrupted prepare
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        if force:
            world_file.unlink(missing_ok=True)
            ckpt.unlink(missing_ok=True)
            if data_dir.exists():
                shutil.rmtree(data_dir)
        info = json.loads(world_file.read_text()) if world_file.is_file() else {}
        workers = 0 if quick else default_workers()  # render processes (the files and weights do not depend on it)
        if not data_dir.is_dir():
            log.info("rendering the toy suite into %s", data_dir)
            info = {"render_seconds": round(_render(data_dir, settings, progress, workers), 2)}
            world_file.unlink(missing_ok=True)
        if not ckpt.is_file():
            log.info(
                "pretraining the toy CLIP (%d steps of %d pairs)", settings.pretrain.steps, settings.pretrain.batch_size
            )
            state, stats = pretrain(settings.pretrain, progress=progress, workers=workers)
            atomic_torch_save(state, ckpt)
            info = {**info, "pretrain": stats}
            world_file.unlink(missing_ok=True)
        if not world_file.is_file() or "zero_shot" not in info:
            names = [*TOY_SUITE["base2novel"], *TOY_SUITE["domain_targets"]]
            zero_shot = evaluate_checkpoint(MODEL_NAME, ckpt, data_dir, names, progress=progress)
            info = {
                **info,
                "key": settings.key(),
                "settings": asdict(settings),
                "renderer_version": RENDERER_VERSION,
                "backbone_name": MODEL_NAME,
                "zero_shot": zero_shot,
                "chance": {n: round(100.0 / len(DATASETS[n].classnames), 2) for n in names},
            }
            atomic_write_text(world_file, json.dumps(info, indent=2, sort_keys=True))
    return ToyWorld(data_root=data_dir, checkpoint=ckpt, zero_shot=dict(info["zero_shot"]), info=info)


__all__ = ["ToyWorld", "WorldSettings", "ensure_toy_world", "world_settings"]
