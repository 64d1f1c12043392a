"""Toy renderer and suite: determinism, CoOp layout read by the real loaders, scene metadata, caption coverage."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mugcp_bench.datasets.base import prepare
from mugcp_bench.registry import DATASETS as REGISTRY
from mugcp_bench.toy import render
from mugcp_bench.toy.pretrain import PretrainSettings, _sample_group
from mugcp_bench.toy.suite import (
    DATASETS,
    SOURCE_COLORS,
    SOURCE_SHAPES,
    TOY_SUITE,
    SuiteSizes,
    load_scene_metadata,
    write_suite,
)

TINY = SuiteSizes(train=2, val=1, test=1)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_renders_identical_files(tmp_path: Path) -> None:
    write_suite(tmp_path / "a", TINY, seed=3)
    write_suite(tmp_path / "b", TINY, seed=3)
    write_suite(tmp_path / "c", TINY, seed=4)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert len(a) > 300 and a == b
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) > 0.9 * len(pngs)  # another seed gives other images


def test_worker_processes_render_the_same_files(tmp_path: Path) -> None:
    write_suite(tmp_path / "a", TINY, seed=3, workers=0)
    write_suite(tmp_path / "b", TINY, seed=3, workers=2)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


def test_render_workers_leave_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A prepare killed by a signal never shuts its pool down: its workers must not linger (holding its log open)."""
    script = (
        "import os, sys, time, numpy as np\n"
        "from mugcp_bench.toy import render\n"
        "from mugcp_bench.toy.workers import RenderPool\n"
        "with RenderPool(2) as pool:\n"
        "    pool.render([render.sample_scene(np.random.default_rng(i)) for i in range(4)])\n"
        "    print(*pool._pool._processes, flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in child.stdout.readline().split()]
    finally:
        child.kill()
        child.wait()
    assert len(workers) == 2

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


def test_render_is_pure_and_uses_no_global_rng() -> None:
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    for layout in render.LAYOUTS:
        for style in render.STYLES:
            scene = render.sample_scene(np.random.default_rng(7), layout=layout, style=style)
            x, y = render.render(scene), render.render(scene)
            assert x.shape == (render.IMAGE_SIZE, render.IMAGE_SIZE, 3) and x.dtype == np.uint8
            assert np.array_equal(x, y)
            assert x.std() > 5  # not blank
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_data")
    write_suite(root, SuiteSizes(train=16, val=4, test=2), seed=0)
    return root


def test_suite_reads_through_the_real_loaders(suite_root: Path, tmp_path: Path) -> None:
    names = [*TOY_SUITE["base2novel"], *TOY_SUITE["domain_targets"]]
    assert sorted(names) == sorted(DATASETS) == REGISTRY.names("toy_*")
    assert TOY_SUITE["base2novel"][0] == TOY_SUITE["source"] == "toy_objects"
    for name in TOY_SUITE["base2novel"]:
        n_cls = len(DATASETS[name].classnames)
        spec = REGISTRY.get(name)
        assert spec.group == "toy" and spec.check(suite_root).ok
        full = spec.load(suite_root)
        assert full.classnames == list(DATASETS[name].classnames)
        assert (len(full.train), len(full.val), len(full.test)) == (16 * n_cls, 4 * n_cls, 2 * n_cls)
        shot = prepare(name, suite_root, shots=16, seed=1, subset="all", cache_dir=tmp_path)
        assert len(shot.train) == 16 * n_cls and len(shot.val) == 4 * n_cls
        base = prepare(name, suite_root, shots=16, seed=1, subset="base", cache_dir=tmp_path)
        new = prepare(name, suite_root, shots=16, seed=1, subset="new", cache_dir=tmp_path)
        assert base.num_classes == (n_cls + 1) // 2 and base.num_classes + new.num_classes == n_cls
        assert base.classnames + new.classnames == full.classnames
    assert REGISTRY.get("toy_objects").load(suite_root).num_classes == 48
    for name in TOY_SUITE["domain_targets"]:
        spec = REGISTRY.get(name)
        assert spec.test_only and spec.label_space == "toy_objects"
        data = prepare(name, suite_root, shots=16, seed=1)
        assert data.classnames == list(DATASETS["toy_objects"].classnames)
        assert len(data.test) == 2 * 48 and data.train == data.test


def test_scene_metadata_matches_labels(suite_root: Path) -> None:
    for name, ds in DATASETS.items():
        folder = suite_root / name
        meta = load_scene_metadata(folder)
        split = json.loads((folder / ds.split_file).read_text())
        listed = {f"images/{p}": (y, c) for part in ("train", "val", "test") for p, y, c in split[part]}
        assert set(meta) == set(listed)
        for path, rec in meta.items():
            assert (folder / path).is_file()
            assert (rec["label"], rec["classname"]) == listed[path]
            for key, value in ds.class_attributes(rec["label"]).items():
                assert rec[key] == value, (name, path, key)
            assert rec["style"] == ds.style and rec["caption"].endswith(".")


def test_source_base_and_novel_halves_cover_every_colour_and_shape() -> None:
    names = DATASETS["toy_objects"].classnames
    assert len(names) == len(set(names)) == len(SOURCE_COLORS) * len(SOURCE_SHAPES)
    for half in (names[:24], names[24:]):
        assert {n.split()[0] for n in half} == set(SOURCE_COLORS)
        assert {n.split()[1] for n in half} == set(SOURCE_SHAPES)


def test_pretraining_captions_cover_the_whole_vocabulary() -> None:
    settings = PretrainSettings()
    gens = list(DATASETS.values())
    p = np.full(len(gens), 1.0 / len(gens))
    rng = np.random.default_rng(0)
    # 2,500 groups: under a tenth of what the default pretraining draws (steps x batch / group size = 28,800)
    n_groups = 2500
    assert n_groups * 10 <= settings.steps * settings.batch_size // settings.group_size
    text = " ".join(t for _ in range(n_groups) for _, t in _sample_group(rng, settings, gens, p))
    words = [*render.COLORS, *render.SHAPES, *render.PATTERNS, *render.BACKGROUNDS, *render.COUNT_WORDS]
    words += [c for ds in DATASETS.values() for c in ds.classnames]
    missing = [w for w in words if not re.search(rf"\b{re.escape(w)}\b", text)]
    missing += [ds.prompt(y) for ds in DATASETS.values() for y in range(len(ds.classnames)) if ds.prompt(y) not in text]
    assert not missing


def test_minimal_pairs_change_one_attribute_and_labels_round_trip() -> None:
    rng = np.random.default_rng(5)
    for ds in DATASETS.values():
        for label in range(len(ds.classnames)):
            scene = ds.sample(label, rng)
            assert ds.label_of(scene) == label
        other = render.with_attributes(scene, rng, shape="star" if scene.shape != "star" else "circle")
        assert other.noise_seed == scene.noise_seed and other.centers == scene.centers
        assert other.color == scene.color and other.shape != scene.shape
        assert not np.array_equal(render.render(other), render.render(scene))
    count_scene = DATASETS["toy_counts"].sample(0, rng)
    assert render.with_attributes(count_scene, rng, count=5).count == 5


def test_source_warm_light_is_a_shift_pretraining_never_shows() -> None:
    source = DATASETS["toy_objects"]
    assert source.lighting == "warm" and all(ds.lighting == "neutral" for ds in DATASETS.values() if ds is not source)
    rng = np.random.default_rng(1)
    scene = source.sample(0, rng)
    warm, neutral = render.render(scene).astype(float), render.render(replace(scene, lighting="neutral")).astype(float)
    assert warm[..., 0].mean() > neutral[..., 0].mean() and warm[..., 2].mean() < neutral[..., 2].mean()
    gens = list(DATASETS.values())
    p = np.array([1.0 if ds is source else 0.0 for ds in gens])  # draw every group from the source generator
    pairs = [pair for _ in range(50) for pair in _sample_group(rng, PretrainSettings(free_scene_prob=0.0), gens, p)]
    assert {s.lighting for s, _ in pairs} == {"neutral"}
