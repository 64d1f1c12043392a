"""Class-name cleaning rules of the CoOp-layout datasets (docs/protocol.md §1.3).

The official split JSONs already hold the cleaned names; these functions restate the rules so that `check-data`
can validate a JSON's names and so that a split can be rebuilt from raw data. Prompts later replace `_` by spaces.
"""

from __future__ import annotations

import re

CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

EUROSAT_RENAMES = {
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


def caltech101_classes(folders: list[str]) -> list[tuple[str, str]]:
    """(folder, class name) in label order: sorted folders without BACKGROUND_Google and Faces_easy, renamed."""
    kept = sorted(f for f in folders if f not in CALTECH101_IGNORED)
    return [(f, caltech101_classname(f)) for f in kept]


def caltech101_classname(folder: str) -> str:
    """Caltech101 folder -> class name (`airplanes` -> `airplane`, ...); other names verbatim."""
    if folder in CALTECH101_IGNORED:
        raise ValueError(f"Caltech101 folder {folder} is not a class")
    return CALTECH101_RENAMES.get(folder, folder)


def oxford_pets_classname(filename: str) -> str:
    """OxfordPets breed from an image file name: prefix before the last underscore, lower-cased."""
    stem = filename.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return "_".join(stem.split("_")[:-1]).lower()


def stanford_cars_classname(devkit_name: str) -> str:
    """StanfordCars devkit name with the trailing year moved to the front ("AM General Hummer SUV 2000" ->
    "2000 AM General Hummer SUV")."""
    words = devkit_name.split(" ")
    return " ".join([words[-1], *words[:-1]])


def oxford_flowers_classname(cat_to_name: dict[str, str], label: int) -> str:
    """Flowers102 name of a 0-based label: the `cat_to_name.json` entry keyed by the 1-based label as a string."""
    return cat_to_name[str(label + 1)]


def sun397_classname(category_path: str) -> str:
    """SUN397 category path `x/<cat>[/<sub>]` (leading `/` allowed): drop the first-letter directory, reverse the
    remaining parts, join with a space (`a/apartment_building/outdoor` -> "outdoor apartment_building")."""
    parts = category_path.strip("/").split("/")[1:]
    return " ".join(reversed(parts))


def ucf101_classname(action: str) -> str:
    """UCF101 CamelCase action split into words joined by underscores (`ApplyEyeMakeup` -> "Apply_Eye_Makeup")."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


def eurosat_classname(folder: str) -> str:
    """EuroSAT folder -> class name (`AnnualCrop` -> "Annual Crop Land", ...)."""
    return EUROSAT_RENAMES[folder]


def imagenet_classnames(text: str) -> dict[str, str]:
    """`classnames.txt` content -> {wnid: name} in file order; each line is wnid, one space, name (split on the first
    space only; the name may contain spaces). Blank lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        out[wnid] = name
    return out


# Expected class name derived from a JSON impath (relative to the image dir), for the JSON datasets whose names follow
# from the path. Used by check-data to validate split JSONs.


def caltech101_name_from_path(impath: str) -> str:
    return caltech101_classname(impath.split("/", 1)[0])


def oxford_pets_name_from_path(impath: str) -> str:
    return oxford_pets_classname(impath)


def folder_name_from_path(impath: str) -> str:
    """Food101, DTD: the class folder name."""
    return impath.split("/", 1)[0]


def sun397_name_from_path(impath: str) -> str:
    return sun397_classname(impath.rsplit("/", 1)[0])


def eurosat_name_from_path(impath: str) -> str:
    return eurosat_classname(impath.split("/", 1)[0])


def ucf101_name_from_path(impath: str) -> str:
    """UCF101 JSON paths look like `Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg`: the folder is the split CamelCase
    action. The folder is used, not the file name: UCF101's own file names differ in case for some classes
    (`HandstandPushups/v_HandStandPushups_...`), and the reference loader takes the action from the folder."""
    folder = impath.split("/", 1)[0]
    return ucf101_classname(folder.replace("_", ""))
