"""The 15 dataset specs on miniature trees: class names, label order, class counts, layout (docs/protocol.md §1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mugcp_bench.datasets import dataset_names, get_spec, prepare
from mugcp_bench.datasets.base import DatasetProblem
from mugcp_bench.errors import UserError
from mugcp_bench.paths import default_cache_dir, resolve_data_root
from mugcp_bench.registry import DATASETS
from tests.miniature import ALL_NAMES, MINI_CLASSNAMES, build_miniature, write_image

BENCHMARK = [
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
]  # fmt: skip

# docs/protocol.md §1.1 folders and §5.1 templates
FOLDERS = {
    "imagenet": "imagenet", "caltech101": "caltech-101", "oxford_pets": "oxford_pets",
    "stanford_cars": "stanford_cars", "oxford_flowers": "oxford_flowers", "food101": "food-101",
    "fgvc_aircraft": "fgvc_aircraft", "sun397": "sun397", "dtd": "dtd", "eurosat": "eurosat", "ucf101": "ucf101",
    "imagenet_v2": "imagenetv2", "imagenet_sketch": "imagenet-sketch", "imagenet_a": "imagenet-adversarial",
    "imagenet_r": "imagenet-rendition",
}  # fmt: skip
TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"))


def test_registry_holds_the_15_datasets_in_protocol_order() -> None:
    assert dataset_names("all") == BENCHMARK
    assert set(ALL_NAMES) == set(BENCHMARK)  # a new benchmark dataset needs a miniature tree
    assert dataset_names("benchmark") == BENCHMARK
    assert dataset_names("Caltech101, flowers102,imagenetv2,caltech101") == [
        "caltech101",
        "oxford_flowers",
        "imagenet_v2",
    ]


@pytest.mark.parametrize("name", BENCHMARK)
def test_spec_attributes(name: str) -> None:
    spec = get_spec(name)
    assert spec.name == name
    assert spec.folder == FOLDERS[name]
    assert spec.template == TEMPLATES[name]
    assert spec.test_only == (name in {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"})
    assert spec.label_space == ("imagenet" if name in {"imagenet_v2", "imagenet_sketch"} else None)
    tree = spec.expected_tree()
    assert tree.startswith(f"$DATA/{FOLDERS[name]}/") and len(tree.splitlines()) >= 3
    assert spec.source and "\n" not in spec.homepage


@pytest.mark.parametrize("name", BENCHMARK)
def test_load_miniature(mini: Path, name: str) -> None:
    data = get_spec(name).load(mini)
    assert data.name == name
    assert data.classnames == MINI_CLASSNAMES[name]
    for part in (data.train, data.val, data.test):
        for d in part:
            assert os.path.isabs(d.impath) and os.path.isfile(d.impath)
            assert d.impath == os.path.join(str(mini), *d.relpath.split("/"))
            assert d.relpath.startswith(FOLDERS[name] + "/")
            assert data.classnames[d.label] == d.classname
    assert {d.label for d in data.train} == set(range(len(MINI_CLASSNAMES[name])))
    if get_spec(name).test_only:
        assert data.train == data.test and data.val == []


def test_caltech_names_and_label_order(mini: Path) -> None:
    data = get_spec("caltech101").load(mini)
    # sorted folder order (upper case first), BACKGROUND_Google and Faces_easy dropped, four renames
    assert data.classnames == ["face", "leopard", "motorbike", "accordion", "airplane", "anchor"]
    assert not any("BACKGROUND" in d.relpath or "Faces_easy" in d.relpath for d in data.train + data.val + data.test)
    assert {d.relpath.split("/")[2] for d in data.train if d.label == 4} == {"airplanes"}


def test_stanford_cars_paths_relative_to_dataset_folder(mini: Path) -> None:
    data = get_spec("stanford_cars").load(mini)
    assert data.train[0].relpath.startswith("stanford_cars/cars_train/")
    assert data.test[0].relpath.startswith("stanford_cars/cars_test/")
    assert data.classnames[0] == "2000 AM General Hummer SUV"


def test_fgvc_labels_are_variant_line_indices(mini: Path) -> None:
    data = get_spec("fgvc_aircraft").load(mini)
    assert data.classnames == ["707-320", "727-200", "F-16A/B", "Falcon 2000"]  # "Falcon 2000": split on 1st space
    assert all(d.relpath.startswith("fgvc_aircraft/images/") and d.relpath.endswith(".jpg") for d in data.test)


def test_imagenet_sorted_wnids_sorted_files_val_is_test(mini: Path) -> None:
    data = get_spec("imagenet").load(mini)
    assert data.val_is_test and data.val == data.test
    wnids = [d.relpath.split("/")[3] for d in data.train]
    assert wnids == sorted(wnids)
    assert [d.label for d in data.train] == sorted(d.label for d in data.train)
    for label in range(5):
        files = [d.relpath for d in data.train if d.label == label]
        assert files == sorted(files)
    assert data.train[0].classname == "tench" and data.train[0].label == 0


def test_imagenet_v2_numbered_folders(mini: Path) -> None:
    data = get_spec("imagenet_v2").load(mini)
    assert all(d.relpath.split("/")[2] == str(d.label) for d in data.test)
    assert data.classnames == get_spec("imagenet").load(mini).classnames


def test_imagenet_a_r_relabelled_200_way_on_real_size_label_set(tmp_path: Path) -> None:
    wnids = [f"n{10000000 + 37 * i:08d}" for i in range(1000)]
    for folder, image_dir in (("imagenet-adversarial", "imagenet-a"), ("imagenet-rendition", "imagenet-r")):
        d = tmp_path / folder
        d.mkdir()
        (d / "classnames.txt").write_text("".join(f"{w} class {i} name\n" for i, w in enumerate(wnids)))
        (d / image_dir).mkdir()
        (d / image_dir / "README.txt").write_text("ignored\n")
        chosen = wnids[::5][::-1]  # 200 of the 1000, created in reverse order: loading must sort them
        for w in chosen:
            write_image(d / image_dir / w / "0.jpg", 0)
    for name in ("imagenet_a", "imagenet_r"):
        data = get_spec(name).load(tmp_path)
        assert data.num_classes == 200
        assert sorted({d.label for d in data.test}) == list(range(200))
        assert data.classnames == [f"class {i} name" for i in range(0, 1000, 5)]
        assert data.classnames[1] == "class 5 name"  # names from the 1000-class file, split on the first space


def test_variant_classnames_fall_back_to_imagenet(tmp_path: Path) -> None:
    build_miniature(tmp_path, ["imagenet", "imagenet_r"])
    os.remove(tmp_path / "imagenet-rendition" / "classnames.txt")
    assert get_spec("imagenet_r").load(tmp_path).classnames == MINI_CLASSNAMES["imagenet_r"]
    os.remove(tmp_path / "imagenet" / "classnames.txt")
    with pytest.raises(DatasetProblem, match="classnames.txt"):
        get_spec("imagenet_r").load(tmp_path)


def test_imagenet_sketch_requires_every_wnid(tmp_path: Path) -> None:
    build_miniature(tmp_path, ["imagenet_sketch"])
    shutil.rmtree(tmp_path / "imagenet-sketch" / "images" / "n01443537")
    with pytest.raises(DatasetProblem, match="n01443537"):
        get_spec("imagenet_sketch").load(tmp_path)


def test_prepare_test_only_ignores_shots_and_refuses_base(mini: Path) -> None:
    full = get_spec("imagenet_a").load(mini)
    assert prepare("imagenet_a", mini, shots=16, seed=1, subset="all") == full
    with pytest.raises(UserError, match="test-only"):
        prepare("imagenet_a", mini, shots=16, seed=1, subset="new")


def test_unknown_dataset_did_you_mean() -> None:
    with pytest.raises(UserError, match="Did you mean 'oxford_flowers'"):
        DATASETS.get("oxford_flower")


def test_data_root_and_cache_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MUGCP_DATA", str(tmp_path / "env"))
    assert resolve_data_root("cli") == Path(os.path.abspath("cli"))
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("MUGCP_DATA")
    assert resolve_data_root(None) == Path(os.path.abspath("data"))
    monkeypatch.setenv("MUGCP_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MUGCP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mugcp-bench"
