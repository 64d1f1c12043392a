"""Few-shot sampling (Dassl-identical), its cache, and the base/novel split (docs/protocol.md §1.5-1.6)."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import OrderedDict
from pathlib import Path

import pytest

from mugcp_bench.datasets import fewshot, get_spec, prepare, subsample_classes
from mugcp_bench.datasets.base import Datum, SplitData, fewshot_cache_path
from mugcp_bench.errors import UserError
from tests.miniature import build_miniature


@pytest.fixture(autouse=True)
def _keep_global_random_state():
    state = random.getstate()
    yield
    random.setstate(state)


def spec_restatement(train: list[Datum], val: list[Datum], k: int, seed: int) -> tuple[list[Datum], list[Datum]]:
    """docs/protocol.md §1.5 written out independently, with Python's global `random` as Dassl uses it."""
    random.seed(seed)  # the run seed seeds Python's random module before the dataset is built

    def draw(items: list[Datum], shots: int) -> list[Datum]:
        by_label: OrderedDict[int, list[Datum]] = OrderedDict()
        for item in items:
            if item.label not in by_label:
                by_label[item.label] = []
            by_label[item.label].append(item)
        result: list[Datum] = []
        for group in by_label.values():
            result += random.sample(group, shots) if len(group) >= shots else list(group)
        return result

    new_train = draw(train, k)
    new_val = draw(val, min(k, 4))  # same stream, after the train draw
    return new_train, new_val


def uneven_split(name: str = "synthetic") -> SplitData:
    """20 classes with 0..39 train images (class sizes below and above 16), in a shuffled (non-label) order."""
    rng = random.Random(1234)
    train, val, test = [], [], []
    for label in range(20):
        n_train = [1, 2, 3, 5, 8, 15, 16, 17, 40, 7][label % 10] + label // 10
        for part, n in ((train, n_train), (val, [1, 3, 4, 6][label % 4]), (test, 3)):
            for i in range(n):
                rel = f"{name}/c{label}/{len(part)}_{i}.jpg"
                part.append(Datum(impath="/data/" + rel, label=label, classname=f"class_{label}", relpath=rel))
    rng.shuffle(train)
    rng.shuffle(val)
    return SplitData(name=name, train=train, val=val, test=test, classnames=[f"class_{y}" for y in range(20)])


def test_local_random_equals_seeded_global_random() -> None:
    population = list(range(1000))
    for seed in (1, 2, 3):
        random.seed(seed)
        expected = [random.sample(population, 16), random.sample(population[:50], 4)]
        local = random.Random(seed)
        assert [local.sample(population, 16), local.sample(population[:50], 4)] == expected


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_fewshot_equals_spec_restatement(seed: int, shots: int) -> None:
    data = uneven_split()
    got = fewshot(data, shots, seed, cache_dir=None)
    want_train, want_val = spec_restatement(data.train, data.val, shots, seed)
    assert got.train == want_train
    assert got.val == want_val
    assert got.test == data.test
    # small classes are kept whole, never repeated
    for label in range(20):
        n_all = sum(d.label == label for d in data.train)
        assert sum(d.label == label for d in got.train) == min(n_all, shots)
    assert len({d.relpath for d in got.train}) == len(got.train)


def test_fewshot_does_not_touch_global_random() -> None:
    random.seed(99)
    before = random.getstate()
    fewshot(uneven_split(), 16, 1, cache_dir=None)
    assert random.getstate() == before


def test_fewshot_on_miniature_matches_restatement(tmp_path: Path) -> None:
    build_miniature(tmp_path, ["caltech101"])  # train sizes 6, 3, 5, 1, 4, 2: some classes below 4
    full = get_spec("caltech101").load(tmp_path)
    for seed in (1, 2, 3):
        got = prepare("caltech101", tmp_path, shots=4, seed=seed, subset="all", cache_dir=None)
        want_train, want_val = spec_restatement(full.train, full.val, 4, seed)
        assert (got.train, got.val) == (want_train, want_val)


def test_imagenet_samples_train_only(tmp_path: Path) -> None:
    build_miniature(tmp_path, ["imagenet"])
    full = get_spec("imagenet").load(tmp_path)
    got = fewshot(full, 2, 1, cache_dir=tmp_path / "cache")
    random.seed(1)
    want_train, _ = spec_restatement(full.train, [], 2, 1)
    assert got.train == want_train
    assert got.val == full.test == got.test
    cached = json.loads(next((tmp_path / "cache" / "fewshot" / "imagenet").glob("*.json")).read_text())
    assert cached["val"] == []


def test_cache_round_trip_and_corrupt_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_miniature(tmp_path, ["dtd"])
    cache = tmp_path / "cache"
    first = prepare("dtd", tmp_path, shots=2, seed=3, subset="all", cache_dir=cache)
    files = list((cache / "fewshot" / "dtd").glob("*.json"))
    assert [f.name for f in files] == [fewshot_cache_path(cache, get_spec("dtd").load(tmp_path), 2, 3).name]
    obj = json.loads(files[0].read_text())
    assert obj["shots"] == 2 and obj["seed"] == 3
    assert [tuple(x) for x in obj["train"]] == [(d.relpath, d.label) for d in first.train]
    assert all(not p.startswith("/") and p.startswith("dtd/images/") for p, _ in obj["train"] + obj["val"])

    # the cache is read: an edited (still valid) cache file decides the subset
    full = get_spec("dtd").load(tmp_path)
    other = [d for d in full.train if (d.relpath, d.label) not in {tuple(x) for x in obj["train"]}]
    obj["train"] = [[d.relpath, d.label] for d in other]
    files[0].write_text(json.dumps(obj))
    assert prepare("dtd", tmp_path, shots=2, seed=3, subset="all", cache_dir=cache).train == other

    # a corrupt cache is ignored with a warning and regenerated
    files[0].write_text('{"train": [[')
    with caplog.at_level(logging.WARNING, logger="mugcp_bench.datasets.base"):
        again = prepare("dtd", tmp_path, shots=2, seed=3, subset="all", cache_dir=cache)
    assert again == first
    assert "few-shot cache" in caplog.text
    assert json.loads(files[0].read_text())["train"] == [[d.relpath, d.label] for d in first.train]
    assert not [p for p in files[0].parent.iterdir() if p.name.endswith(".tmp")]


def test_cache_key_changes_with_split_content(tmp_path: Path) -> None:
    data = uneven_split()
    changed = SplitData(name=data.name, train=data.train[:-1], val=data.val, test=data.test, classnames=data.classnames)
    assert fewshot_cache_path(tmp_path, data, 16, 1) != fewshot_cache_path(tmp_path, changed, 16, 1)
    assert fewshot_cache_path(tmp_path, data, 16, 1) != fewshot_cache_path(tmp_path, data, 16, 2)


# docs/protocol.md §1.6 table
REAL_SIZES = {
    "imagenet": (1000, 500, 500), "caltech101": (100, 50, 50), "oxford_pets": (37, 19, 18),
    "stanford_cars": (196, 98, 98), "oxford_flowers": (102, 51, 51), "food101": (101, 51, 50),
    "fgvc_aircraft": (100, 50, 50), "sun397": (397, 199, 198), "dtd": (47, 24, 23), "eurosat": (10, 5, 5),
    "ucf101": (101, 51, 50),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL_SIZES))
def test_base_novel_counts_on_real_size_label_sets(name: str) -> None:
    n, n_base, n_new = REAL_SIZES[name]
    items = [Datum(f"/x/{y}.jpg", y, f"c{y}", f"x/{y}.jpg") for y in range(n)]
    data = SplitData(name=name, train=items, val=items, test=items, classnames=[f"c{y}" for y in range(n)])
    base, new = subsample_classes(data, "base"), subsample_classes(data, "novel")
    assert (base.num_classes, new.num_classes) == (n_base, n_new) == (math.ceil(n / 2), n - math.ceil(n / 2))
    assert new.classnames[0] == f"c{n_base}"
    assert [d.label for d in new.test] == list(range(n_new))


def test_subsample_relabels_in_label_order_and_filters_all_lists() -> None:
    data = fewshot(uneven_split(), 16, 2, cache_dir=None)
    base = subsample_classes(data, "base")
    new = subsample_classes(data, "new")
    assert base.classnames == [f"class_{y}" for y in range(10)]
    assert new.classnames == [f"class_{y}" for y in range(10, 20)]
    for part in ("train", "val", "test"):
        old = getattr(data, part)
        assert [(d.relpath, d.label) for d in getattr(base, part)] == [
            (d.relpath, d.label) for d in old if d.label < 10
        ]
        assert [(d.relpath, d.label) for d in getattr(new, part)] == [
            (d.relpath, d.label - 10) for d in old if d.label >= 10
        ]
    assert subsample_classes(data, "all") is data
    with pytest.raises(UserError, match="Did you mean 'base'"):
        subsample_classes(data, "bsae")


def test_prepare_base_new_on_miniature(tmp_path: Path) -> None:
    build_miniature(tmp_path, ["eurosat"])
    base = prepare("eurosat", tmp_path, shots=16, seed=1, subset="base", cache_dir=tmp_path / "c")
    new = prepare("eurosat", tmp_path, shots=16, seed=1, subset="new", cache_dir=tmp_path / "c")
    assert base.classnames == ["Annual Crop Land", "Forest"]
    assert new.classnames == ["Herbaceous Vegetation Land", "Highway or Road"]
    assert {d.label for d in new.test} == {0, 1}
