"""ImageNet and its four test-only variants: ImageNetV2, -Sketch, -A, -R (docs/protocol.md §1.4).

ImageNet has no split file: labels are the indices of the wnid folders of `images/train` in sorted order and the
test set is `images/val` (the val split is the same list). The reference loader lists each folder in unsorted
directory order, so its few-shot subsets depend on the machine; this suite sorts every file list, which makes its
ImageNet subsets reproducible but means they cannot equal the original runs' subsets (docs/protocol.md §1.5).
"""

from __future__ import annotations

import os
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
from mugcp_bench.datasets.zhou_json import COOP_DATASETS_MD

CLASSNAMES_FILE = "classnames.txt"
CLASSNAMES_SOURCE = (
    "classnames.txt (one line per class: wnid, a space, the CLIP class name; sorted by wnid) is linked from "
    f"{COOP_DATASETS_MD}#imagenet"
)


def sorted_subdirs(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (files such as README.txt are left out)."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def sorted_files(path: Path) -> list[str]:
    """Sorted names of the non-hidden files of a folder."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())


class ImageFolderSpec(DatasetSpec):
    """Shared helpers of the ImageNet family: class-name file and class folders read from disk."""

    image_dir = ""
    template = "a photo of a {}."
    # Lists come from directory listings: every file exists by construction, so `load` skips the per-file check.
    listed_from_disk = True

    def _require_images(self, data: SplitData) -> None:
        return None

    def read_classnames(self, root: Path, dataset_dir: Path) -> dict[str, str]:
        """{wnid: name} from the dataset's own classnames.txt; the variants fall back to imagenet/classnames.txt."""
        candidates = [dataset_dir / CLASSNAMES_FILE]
        if self.folder != "imagenet":
            candidates.append(Path(os.path.abspath(root)) / "imagenet" / CLASSNAMES_FILE)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetProblem(
                "missing split file",
                f"dataset {self.name}: {candidates[0]} not found; "
                + CLASSNAMES_SOURCE
                + (" (or copy $DATA/imagenet/classnames.txt there)" if len(candidates) > 1 else ""),
            )
        with open(path, encoding="utf-8") as f:
            names = cleaning.imagenet_classnames(f.read())
        bad = next((w for w, n in names.items() if not n.strip()), None)
        if not names or bad is not None:
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: {path} must hold lines '<wnid> <class name>'"
                + (f" (line for {bad} has no name)" if bad else " (file is empty)")
                + f"; {CLASSNAMES_SOURCE}",
            )
        return names

    def list_class_folder(self, root: Path, class_dir: Path, label: int, classname: str) -> list[Datum]:
        files = sorted_files(class_dir)
        if not files:
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: class folder {class_dir} holds no images; re-extract the dataset",
            )
        rel_dir = os.path.relpath(class_dir, os.path.abspath(root))
        return [make_datum(root, rel_to_root(rel_dir, f), label, classname) for f in files]

    def wnid_folders(self, root: Path, image_root: Path, names: dict[str, str], *, all_required: bool) -> list[str]:
        wnids = sorted_subdirs(image_root)
        unknown = [w for w in wnids if w not in names]
        if unknown:
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: folder {image_root / unknown[0]} is not a wnid of {CLASSNAMES_FILE} "
                f"({len(unknown)} unknown folders); remove stray folders or fix {CLASSNAMES_FILE}",
            )
        if all_required and len(wnids) != len(names):
            missing = [w for w in names if w not in set(wnids)]
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: {image_root} has {len(wnids)} of the {len(names)} wnid folders of "
                f"{CLASSNAMES_FILE} (first missing: {missing[0]}); re-extract the dataset",
            )
        return wnids

    def read_wnid_tree(self, root: Path, image_root: Path, names: dict[str, str], wnids: list[str]) -> list[Datum]:
        items: list[Datum] = []
        for label, wnid in enumerate(wnids):
            items += self.list_class_folder(root, image_root / wnid, label, names[wnid])
        return items


class ImageNetSpec(ImageFolderSpec):
    name = "imagenet"
    folder = "imagenet"
    display_name = "ImageNet"
    roles = ("base2novel", "source", "few_shot")  # the cross-dataset and domain-generalization source
    order = 0
    image_dir = "images"
    homepage = "https://image-net.org (ILSVRC-2012 train and val)"
    source = (
        "Images: ILSVRC-2012 from https://image-net.org, train and val each as 1,000 wnid folders under "
        "imagenet/images/train and imagenet/images/val (symbolic links are fine; val must be in wnid folders).\n"
        + CLASSNAMES_SOURCE
    )

    def tree_lines(self) -> list[tuple[str, str]]:
        return [
            ("images/train/", "1,000 wnid folders (n01440764/, ...); label = sorted wnid index"),
            ("images/val/", "the same 1,000 wnid folders; the test set (the val split is the same list)"),
            (CLASSNAMES_FILE, "'<wnid> <class name>' per line"),
        ]

    def read(self, root: Path) -> SplitData:
        d = self._require_folder(root)
        names = self.read_classnames(root, d)
        train_root = self._require_dir(d / "images" / "train", "image folder")
        val_root = self._require_dir(d / "images" / "val", "image folder")
        wnids = self.wnid_folders(root, train_root, names, all_required=False)
        val_wnids = self.wnid_folders(root, val_root, names, all_required=False)
        if val_wnids != wnids:
            odd = sorted(set(wnids) ^ set(val_wnids))
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: images/train and images/val hold different wnid folders (e.g. {odd[0]}); "
                "val must be sorted into the same wnid folders as train",
            )
        if not wnids:
            raise DatasetProblem("malformed", f"dataset {self.name}: {train_root} holds no wnid folders")
        train = self.read_wnid_tree(root, train_root, names, wnids)
        test = self.read_wnid_tree(root, val_root, names, wnids)
        classnames = classnames_by_label(train, self.name, "images/train")
        return SplitData(name=self.name, train=train, val=test, test=test, classnames=classnames, val_is_test=True)


class ImageNetVariantSpec(ImageFolderSpec):
    """A test-only ImageNet variant read from wnid folders (Sketch: all 1000; A and R: the 200 present)."""

    test_only = True
    roles = ("domain_generalization",)
    all_wnids_required = False

    def __init__(
        self,
        name: str,
        folder: str,
        image_dir: str,
        *,
        homepage: str,
        display_name: str,
        aliases: tuple[str, ...],
        order: float,
        label_space: str | None,
        all_wnids_required: bool,
        n_classes_text: str,
    ) -> None:
        self.name = name
        self.folder = folder
        self.image_dir = image_dir
        self.homepage = homepage
        self.display_name = display_name
        self.aliases = aliases
        self.order = order
        self.label_space = label_space
        self.all_wnids_required = all_wnids_required
        self.n_classes_text = n_classes_text
        self.source = (
            f"Download from {homepage} and extract to $DATA/{folder}/{image_dir}/; copy $DATA/imagenet/"
            f"{CLASSNAMES_FILE} to $DATA/{folder}/ (if absent, $DATA/imagenet/{CLASSNAMES_FILE} is used)."
        )

    def tree_lines(self) -> list[tuple[str, str]]:
        return [
            (f"{self.image_dir}/", self.n_classes_text),
            (CLASSNAMES_FILE, "copy of imagenet/classnames.txt"),
        ]

    def read(self, root: Path) -> SplitData:
        d = self._require_folder(root)
        names = self.read_classnames(root, d)
        image_root = self._require_dir(d / self.image_dir, "image folder")
        wnids = self.wnid_folders(root, image_root, names, all_required=self.all_wnids_required)
        if not wnids:
            raise DatasetProblem("malformed", f"dataset {self.name}: {image_root} holds no wnid folders")
        test = self.read_wnid_tree(root, image_root, names, wnids)
        classnames = classnames_by_label(test, self.name, self.image_dir)
        return SplitData(name=self.name, train=test, val=[], test=test, classnames=classnames)


class ImageNetV2Spec(ImageFolderSpec):
    """ImageNetV2 matched-frequency: folders "0" ... "999"; label i = folder i, name = i-th line of classnames.txt."""

    name = "imagenet_v2"
    folder = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"
    test_only = True
    label_space = "imagenet"
    display_name = "-V2"  # the domain-generalization tables print the variants after ImageNet as -V2, -Sketch, ...
    aliases = ("imagenetv2",)
    roles = ("domain_generalization",)
    order = 11
    homepage = "https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz"
    source = (
        f"Download {homepage} (see https://github.com/modestyachts/ImageNetV2) and extract it into $DATA/imagenetv2/;"
        f" copy $DATA/imagenet/{CLASSNAMES_FILE} to $DATA/imagenetv2/ (if absent, $DATA/imagenet/{CLASSNAMES_FILE} "
        "is used)."
    )

    def tree_lines(self) -> list[tuple[str, str]]:
        return [
            (f"{self.image_dir}/", "folders 0/ ... 999/ (label i = folder i)"),
            (CLASSNAMES_FILE, "copy of imagenet/classnames.txt"),
        ]

    def read(self, root: Path) -> SplitData:
        d = self._require_folder(root)
        names = list(self.read_classnames(root, d).values())
        image_root = self._require_dir(d / self.image_dir, "image folder")
        test: list[Datum] = []
        for label, classname in enumerate(names):
            class_dir = image_root / str(label)
            if not class_dir.is_dir():
                raise DatasetProblem(
                    "malformed",
                    f"dataset {self.name}: numbered folder {class_dir} is missing ({len(names)} classes in "
                    f"{CLASSNAMES_FILE} need folders 0..{len(names) - 1}); re-extract the dataset",
                )
            test += self.list_class_folder(root, class_dir, label, classname)
        return SplitData(name=self.name, train=test, val=[], test=test, classnames=names)


IMAGENET = ImageNetSpec()
IMAGENET_V2 = ImageNetV2Spec()
IMAGENET_SKETCH = ImageNetVariantSpec(
    "imagenet_sketch",
    "imagenet-sketch",
    "images",
    homepage="https://github.com/HaohanWang/ImageNet-Sketch",
    display_name="-Sketch",
    aliases=("imagenetsketch",),
    order=12,
    label_space="imagenet",
    all_wnids_required=True,
    n_classes_text="1,000 wnid folders; label = sorted wnid index (= ImageNet's labels)",
)
IMAGENET_A = ImageNetVariantSpec(
    "imagenet_a",
    "imagenet-adversarial",
    "imagenet-a",
    homepage="https://github.com/hendrycks/natural-adv-examples",
    display_name="-A",
    aliases=("imageneta", "imagenetadversarial"),
    order=13,
    label_space=None,
    all_wnids_required=False,
    n_classes_text="200 wnid folders (+ README.txt, ignored); relabelled 0..199 in sorted order, 200-way",
)
IMAGENET_R = ImageNetVariantSpec(
    "imagenet_r",
    "imagenet-rendition",
    "imagenet-r",
    homepage="https://github.com/hendrycks/imagenet-r",
    display_name="-R",
    aliases=("imagenetr", "imagenetrendition"),
    order=14,
    label_space=None,
    all_wnids_required=False,
    n_classes_text="200 wnid folders (+ README.txt, ignored); relabelled 0..199 in sorted order, 200-way",
)

for _spec in (IMAGENET, IMAGENET_V2, IMAGENET_SKETCH, IMAGENET_A, IMAGENET_R):
    register_dataset(_spec)
