"""Class-name cleaning rules (docs/protocol.md §1.3) and their use in validating split files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp_bench.datasets import cleaning, get_spec
from tests.miniature import build_miniature


def test_caltech101_drops_two_folders_and_renames_four_on_the_real_size_folder_set() -> None:
    others = [f"class_{i:03d}" for i in range(96)]
    folders = ["BACKGROUND_Google", "Faces_easy", "Faces", "Leopards", "Motorbikes", "airplanes", *others]
    classes = cleaning.caltech101_classes(folders)
    assert len(folders) == 102 and len(classes) == 100
    names = [c for _, c in classes]
    assert names[:3] == ["face", "leopard", "motorbike"]  # sorted folder order: capitals first
    assert "airplane" in names and "airplanes" not in names
    assert names[3:] == sorted(names[3:], key=lambda n: "airplanes" if n == "airplane" else n)
    with pytest.raises(ValueError):
        cleaning.caltech101_classname("BACKGROUND_Google")


def test_eurosat_renames() -> None:
    got = {f: cleaning.eurosat_classname(f) for f in cleaning.EUROSAT_RENAMES}
    assert got == {
        "AnnualCrop": "Annual Crop Land",
        "Forest": "Forest",
        "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings",
        "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land",
        "Residential": "Residential Buildings",
        "River": "River",
        "SeaLake": "Sea or Lake",
    }


def test_sun397_path_rule() -> None:
    assert cleaning.sun397_classname("a/apartment_building/outdoor") == "outdoor apartment_building"
    assert cleaning.sun397_classname("/a/abbey") == "abbey"
    assert cleaning.sun397_classname("b/bakery/shop") == "shop bakery"
    assert cleaning.sun397_name_from_path("a/apartment_building/outdoor/sun_x.jpg") == "outdoor apartment_building"


def test_ucf101_camel_case() -> None:
    assert cleaning.ucf101_classname("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert cleaning.ucf101_classname("YoYo") == "Yo_Yo"
    # the folder decides, not UCF101's inconsistent file names
    assert cleaning.ucf101_name_from_path("Handstand_Pushups/v_HandStandPushups_g01_c01.jpg") == "Handstand_Pushups"


def test_other_rules() -> None:
    assert cleaning.oxford_pets_classname("american_bulldog_12.jpg") == "american_bulldog"
    assert cleaning.oxford_pets_classname("Abyssinian_100.jpg") == "abyssinian"
    assert cleaning.stanford_cars_classname("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert cleaning.oxford_flowers_classname({"1": "pink primrose", "2": "x"}, 0) == "pink primrose"
    text = "n01440764 tench\n\nn01443537 great white shark\n"
    assert cleaning.imagenet_classnames(text) == {"n01440764": "tench", "n01443537": "great white shark"}


def _rewrite(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    ("name", "split_file", "old", "new"),
    [
        ("caltech101", "caltech-101/split_zhou_Caltech101.json", "airplane", "airplanes"),
        ("eurosat", "eurosat/split_zhou_EuroSAT.json", "Forest", "forest"),
        ("sun397", "sun397/split_zhou_SUN397.json", "outdoor apartment_building", "apartment_building outdoor"),
        ("ucf101", "ucf101/split_zhou_UCF101.json", "Apply_Lipstick", "ApplyLipstick"),
        ("oxford_pets", "oxford_pets/split_zhou_OxfordPets.json", "bengal", "Bengal"),
        ("oxford_flowers", "oxford_flowers/split_zhou_OxfordFlowers.json", "canterbury bells", "bells"),
        ("stanford_cars", "stanford_cars/split_zhou_StanfordCars.json", "2012 Acura RL Sedan", "Acura RL Sedan 2012"),
        ("food101", "food-101/split_zhou_Food101.json", "baklava", "Baklava"),
    ],
)
def test_check_flags_uncleaned_class_names(tmp_path: Path, name: str, split_file: str, old: str, new: str) -> None:
    build_miniature(tmp_path, [name])
    assert get_spec(name).check(tmp_path).ok

    def rename(obj: dict) -> None:
        for part in obj.values():
            for entry in part:
                if entry[2] == old:
                    entry[2] = new

    _rewrite(tmp_path / split_file, rename)
    result = get_spec(name).check(tmp_path)
    assert result.status == "bad class names"
    assert new in result.message and "\n" not in result.message


def test_check_flags_caltech_ignored_folder_and_label_order(tmp_path: Path) -> None:
    build_miniature(tmp_path, ["caltech101"])
    path = tmp_path / "caltech-101/split_zhou_Caltech101.json"
    original = path.read_text()
    _rewrite(path, lambda o: o["test"].append(["BACKGROUND_Google/image_0001.jpg", 0, "face"]))
    assert "not a class" in get_spec("caltech101").check(tmp_path).message

    def swap(obj: dict) -> None:  # labels no longer follow the sorted folder order
        for part in obj.values():
            for entry in part:
                entry[1] = {0: 1, 1: 0}.get(entry[1], entry[1])

    path.write_text(original)
    _rewrite(path, swap)
    result = get_spec("caltech101").check(tmp_path)
    assert result.status == "bad class names" and "sorted class-folder order" in result.message
