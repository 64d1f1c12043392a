"""The `split_zhou_<Name>.json` family: Caltech101, OxfordPets, StanfordCars, Flowers102, Food101, SUN397, DTD,
EuroSAT, UCF101 (docs/protocol.md §1.1-1.3), and `ZhouJsonSpec`, the public spec class any JSON-split dataset can reuse.

Split JSON: {"train", "val", "test"}, each a list of [impath relative to the image dir, label, class name].
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mugcp_bench.datasets import cleaning
from mugcp_bench.datasets.base import (
    DatasetProblem,
    DatasetSpec,
    Datum,
    SplitData,
    classnames_by_label,
    make_datum,
    register_dataset,
    rel_to_root,
)

log = logging.getLogger(__name__)

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
REHOSTED = (
    "If an original link is dead: re-hosted copies of these datasets and split files are listed in the "
    "zhengli97/PromptKD README (Hugging Face)."
)


class ZhouJsonSpec(DatasetSpec):
    """A dataset whose splits are a `split_zhou_*.json` file (CoOp layout).

    Args:
        name: registry name (lowercase), e.g. "caltech101".
        folder: folder under the data root, e.g. "caltech-101".
        image_dir: folder inside `folder` that JSON paths are relative to ("" = the dataset folder itself).
        split_file: JSON file name inside `folder`.
        template: hand-written zero-shot template with one `{}`.
        source: where the data comes from (multi-line instructions, shown by check-data).
        homepage: one URL or phrase for one-line error messages (default: the first line of `source`).
        display_name, aliases, group, roles, order: names and suite membership (see `DatasetSpec`).
        name_from_path: expected class name of a JSON impath (validates a JSON's names; docs/protocol.md §1.3).
        names_by_label: reads a side file of the dataset folder and returns the expected class names in label
            order, or None if the side file is absent.
        labels_follow_sorted_folders: labels must be the index of the image's class folder in sorted folder order.
        extra_tree: further (path, comment) lines of the expected tree.
    """

    def __init__(
        self,
        name: str,
        folder: str,
        image_dir: str,
        split_file: str,
        template: str = "a photo of a {}.",
        source: str = "",
        *,
        homepage: str | None = None,
        display_name: str = "",
        aliases: Iterable[str] = (),
        group: str = "benchmark",
        roles: Iterable[str] = (),
        order: float | None = None,
        image_dir_comment: str = "images",
        name_from_path: Callable[[str], str] | None = None,
        names_by_label: Callable[[Path], list[str] | None] | None = None,
        labels_follow_sorted_folders: bool = False,
        extra_tree: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.name = name
        self.folder = folder
        self.image_dir = image_dir.strip("/")
        self.split_file = split_file
        self.template = template
        self.source = source
        self.homepage = homepage or (source.strip().splitlines()[0] if source.strip() else COOP_DATASETS_MD)
        self.display_name = display_name
        self.aliases = tuple(aliases)
        self.group = group
        self.roles = tuple(roles)
        self.order = order
        self.test_only = False
        self.label_space = None
        self.image_dir_comment = image_dir_comment
        self.name_from_path = name_from_path
        self.names_by_label = names_by_label
        self.labels_follow_sorted_folders = labels_follow_sorted_folders
        self.extra_tree = list(extra_tree)

    def __repr__(self) -> str:
        return f"ZhouJsonSpec({self.name!r}, folder={self.folder!r}, split_file={self.split_file!r})"

    def tree_lines(self) -> list[tuple[str, str]]:
        lines = []
        if self.image_dir:
            lines.append((f"{self.image_dir}/", self.image_dir_comment))
        lines += self.extra_tree
        lines.append((self.split_file, "official split: {train, val, test} lists of [impath, label, classname]"))
        return lines

    def read_split_json(self, path: Path) -> dict[str, list]:
        """Parse and validate the split JSON; DatasetProblem('malformed') naming the file and the position."""
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                f"re-download it from {self.homepage}",
            ) from e
        except UnicodeDecodeError as e:
            raise DatasetProblem(
                "malformed", f"dataset {self.name}: {path} is not UTF-8 text ({e.reason}); re-download it"
            ) from e
        if not isinstance(obj, dict) or any(not isinstance(obj.get(k), list) for k in ("train", "val", "test")):
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: {path} must be an object with lists 'train', 'val' and 'test'; re-download it",
            )
        for part in ("train", "val", "test"):
            for i, entry in enumerate(obj[part]):
                if not (
                    isinstance(entry, list)
                    and len(entry) == 3
                    and isinstance(entry[0], str)
                    and isinstance(entry[1], int)
                    and not isinstance(entry[1], bool)
                    and isinstance(entry[2], str)
                ):
                    raise DatasetProblem(
                        "malformed",
                        f"dataset {self.name}: entry {i} of '{part}' in {path} is not [impath, label, classname] "
                        f"({json.dumps(entry)[:80]}); re-download it",
                    )
        return obj

    def read(self, root: Path) -> SplitData:
        d = self._require_folder(root)
        if self.image_dir:
            self._require_dir(d / self.image_dir, "image folder")
        obj = self.read_split_json(self._require_file(d / self.split_file))

        def _convert(entries: list) -> list[Datum]:
            return [make_datum(root, rel_to_root(self.folder, self.image_dir, p), y, c) for p, y, c in entries]

        train, val, test = _convert(obj["train"]), _convert(obj["val"]), _convert(obj["test"])
        classnames = classnames_by_label(train, self.name, f"the 'train' list of {self.split_file}")
        for part, items in (("val", val), ("test", test)):
            for x in items:
                if not (0 <= x.label < len(classnames)) or classnames[x.label] != x.classname:
                    raise DatasetProblem(
                        "malformed",
                        f"dataset {self.name}: '{part}' item {x.relpath} has label {x.label} '{x.classname}', which "
                        f"does not match the training list of {self.split_file}; re-download it",
                    )
        return SplitData(name=self.name, train=train, val=val, test=test, classnames=classnames)

    def _json_impath(self, d: Datum) -> str:
        """The impath as written in the JSON (relative to the image dir)."""
        prefix = rel_to_root(self.folder, self.image_dir) + "/"
        return d.relpath[len(prefix) :]

    def validate_classnames(self, root: Path, data: SplitData) -> str | None:
        items = [*data.train, *data.val, *data.test]
        if self.name_from_path is not None:
            for x in items:
                impath = self._json_impath(x)
                try:
                    expected = self.name_from_path(impath)
                except (KeyError, ValueError, IndexError):
                    return (
                        f"{impath} in {self.split_file} lies in a folder that is not a class of {self.name} "
                        "(docs/protocol.md §1.3); use the official split file"
                    )
                if expected != x.classname:
                    return (
                        f"class name '{x.classname}' of {impath} in {self.split_file} should be '{expected}' "
                        "(docs/protocol.md §1.3 cleaning rules); use the official split file"
                    )
        if self.labels_follow_sorted_folders:
            folders = sorted({self._json_impath(x).split("/", 1)[0] for x in items})
            index = {f: i for i, f in enumerate(folders)}
            for x in items:
                folder = self._json_impath(x).split("/", 1)[0]
                if index[folder] != x.label:
                    return (
                        f"label {x.label} of {self._json_impath(x)} in {self.split_file} should be {index[folder]} "
                        "(labels follow the sorted class-folder order); use the official split file"
                    )
        if self.names_by_label is not None:
            try:
                expected_names = self.names_by_label(self.dataset_dir(root))
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                return f"cannot read the class-name file of {self.name} ({type(e).__name__}: {e})"
            if expected_names is not None:
                for y, name in enumerate(data.classnames):
                    want = expected_names[y] if y < len(expected_names) else None
                    if want != name:
                        return (
                            f"class name '{name}' of label {y} in {self.split_file} should be '{want}' "
                            "(docs/protocol.md §1.3); use the official split file"
                        )
        return None


# ------------------------------------------------------------------------------------- side files for class names


def flowers_names_by_label(dataset_dir: Path) -> list[str] | None:
    """Expected Flowers102 names from `cat_to_name.json` (keys are 1-based labels), or None if it is absent."""
    path = dataset_dir / "cat_to_name.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        cat_to_name = json.load(f)
    return [cleaning.oxford_flowers_classname(cat_to_name, y) for y in range(len(cat_to_name))]


def stanford_cars_names_by_label(dataset_dir: Path) -> list[str] | None:
    """Expected StanfordCars names from `devkit/cars_meta.mat` (year moved to the front), or None if it is absent."""
    path = dataset_dir / "devkit" / "cars_meta.mat"
    if not path.is_file():
        return None
    from scipy.io import loadmat

    meta = loadmat(os.fspath(path))["class_names"][0]
    return [cleaning.stanford_cars_classname(str(entry[0])) for entry in meta]


# ------------------------------------------------------------------------------------------------ the nine specs

# Each is a base-to-novel and few-shot dataset and a cross-dataset target of the ImageNet source (docs/protocol.md §2).
TARGET_ROLES = ("base2novel", "cross_dataset", "few_shot")

SPECS = [
    ZhouJsonSpec(
        "caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        "a photo of a {}.",
        "Images: https://data.caltech.edu/records/mzrjq-6wc02 (101_ObjectCategories.tar.gz; formerly "
        "http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz), extract into "
        "caltech-101/.\nSplit: split_zhou_Caltech101.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#caltech101",
        display_name="Caltech101",
        aliases=("caltech",),
        roles=TARGET_ROLES,
        order=1,
        image_dir_comment="102 class folders (BACKGROUND_Google and Faces_easy are not used: 100 classes)",
        name_from_path=cleaning.caltech101_name_from_path,
        labels_follow_sorted_folders=True,
    ),
    ZhouJsonSpec(
        "oxford_pets",
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        "a photo of a {}, a type of pet.",
        "Images: https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz, annotations: "
        "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz, extract into oxford_pets/.\n"
        "Split: split_zhou_OxfordPets.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#oxfordpets",
        display_name="OxfordPets",
        roles=TARGET_ROLES,
        order=2,
        aliases=("oxfordpets", "pets"),
        image_dir_comment="<Breed>_<n>.jpg",
        extra_tree=[("annotations/", "optional (used only to rebuild the split)")],
        name_from_path=cleaning.oxford_pets_name_from_path,
    ),
    ZhouJsonSpec(
        "stanford_cars",
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        "a photo of a {}.",
        "Images: cars_train.tgz and cars_test.tgz, devkit car_devkit.tgz and cars_test_annos_withlabels.mat from "
        "http://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline since 2023: use a Kaggle copy plus the "
        "devkit/test-label fix of pytorch/vision#7545).\nSplit: split_zhou_StanfordCars.json, linked from "
        + COOP_DATASETS_MD
        + "\n"
        + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#stanfordcars",
        display_name="StanfordCars",
        roles=TARGET_ROLES,
        order=3,
        aliases=("stanfordcars", "cars"),
        extra_tree=[
            ("cars_train/", "JSON paths are relative to stanford_cars/ itself: cars_train/00001.jpg"),
            ("cars_test/", ""),
            ("devkit/", "cars_meta.mat (class names; checked when present)"),
            ("cars_test_annos_withlabels.mat", ""),
        ],
        names_by_label=stanford_cars_names_by_label,
    ),
    ZhouJsonSpec(
        "oxford_flowers",
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        "a photo of a {}, a type of flower.",
        "Images: https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz, labels: "
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat.\nSplit and names: "
        "split_zhou_OxfordFlowers.json and cat_to_name.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#flowers102",
        display_name="Flowers102",
        roles=TARGET_ROLES,
        order=4,
        aliases=("oxfordflowers", "flowers102", "flowers"),
        image_dir_comment="image_00001.jpg ...",
        extra_tree=[
            ("cat_to_name.json", "class names keyed by 1-based label (checked when present)"),
            ("imagelabels.mat", "optional"),
        ],
        names_by_label=flowers_names_by_label,
    ),
    ZhouJsonSpec(
        "food101",
        "food-101",
        "images",
        "split_zhou_Food101.json",
        "a photo of {}, a type of food.",
        "Images: https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz, extract into the "
        "data root).\nSplit: split_zhou_Food101.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#food101",
        display_name="Food101",
        aliases=("food",),
        roles=TARGET_ROLES,
        order=5,
        image_dir_comment="101 class folders (apple_pie/, ...)",
        name_from_path=cleaning.folder_name_from_path,
        labels_follow_sorted_folders=True,
    ),
    ZhouJsonSpec(
        "sun397",
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        "a photo of a {}.",
        "Images: http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz, partitions: "
        "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip (these links are often dead).\n"
        "Split: split_zhou_SUN397.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#sun397",
        display_name="SUN397",
        aliases=("sun",),
        roles=TARGET_ROLES,
        order=7,
        image_dir_comment="a/abbey/..., a/apartment_building/outdoor/..., ...",
        name_from_path=cleaning.sun397_name_from_path,
    ),
    ZhouJsonSpec(
        "dtd",
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        "{} texture.",
        "Images: https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz (extract into the data root).\n"
        "Split: split_zhou_DescribableTextures.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#dtd",
        display_name="DTD",
        roles=TARGET_ROLES,
        order=8,
        aliases=("describabletextures",),
        image_dir_comment="47 class folders (banded/, ...)",
        name_from_path=cleaning.folder_name_from_path,
        labels_follow_sorted_folders=True,
    ),
    ZhouJsonSpec(
        "eurosat",
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        "a centered satellite photo of {}.",
        "Images: http://madm.dfki.de/files/sentinel/EuroSAT.zip (RGB version; extract into eurosat/).\n"
        "Split: split_zhou_EuroSAT.json, linked from " + COOP_DATASETS_MD + "\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#eurosat",
        display_name="EuroSAT",
        roles=TARGET_ROLES,
        order=9,
        image_dir_comment="10 class folders (AnnualCrop/, Forest/, ...)",
        name_from_path=cleaning.eurosat_name_from_path,
        labels_follow_sorted_folders=True,
    ),
    ZhouJsonSpec(
        "ucf101",
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        "a photo of a person doing {}.",
        "Middle frames: UCF-101-midframes.zip, linked from " + COOP_DATASETS_MD + " (extract into ucf101/).\n"
        "Split: split_zhou_UCF101.json, linked from the same page.\n" + REHOSTED,
        homepage=f"{COOP_DATASETS_MD}#ucf101",
        display_name="UCF101",
        aliases=("ucf",),
        roles=TARGET_ROLES,
        order=10,
        image_dir_comment="101 folders named by the split action (Apply_Eye_Makeup/...jpg)",
        name_from_path=cleaning.ucf101_name_from_path,
    ),
]

for _spec in SPECS:
    register_dataset(_spec)
