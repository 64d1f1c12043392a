"""Miniature on-disk trees of the 15 CoOp-layout datasets for offline tests (tiny 8x8 JPEGs, real split schemas).

    from tests.miniature import build_miniature
    root = build_miniature(tmp_path)                         # all 15 datasets
    root = build_miniature(tmp_path, ["caltech101", "imagenet"])

Each class gets its own colour, so a model can in principle tell classes apart. Class sizes are uneven on purpose
(some train classes have fewer than 4 images). `MINI_CLASSNAMES` holds the class names each loader must produce,
in label order.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

# images per class (cycled over classes): train sizes are uneven, some below 4 shots
TRAIN_SIZES = (6, 3, 5, 1, 4, 2)
VAL_SIZES = (2, 1, 2)
TEST_SIZES = (2, 3)

IMAGENET_WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}
IMAGENET_A_WNIDS = ("n01443537", "n01484850", "n01494475")
IMAGENET_R_WNIDS = ("n01440764", "n01491361", "n01494475")

# (class folder or file prefix on disk, cleaned class name), in label order
CALTECH = [
    ("Faces", "face"),
    ("Leopards", "leopard"),
    ("Motorbikes", "motorbike"),
    ("accordion", "accordion"),
    ("airplanes", "airplane"),
    ("anchor", "anchor"),
]
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
PETS = [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"), ("Bengal", "bengal")]
CARS_DEVKIT = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
FOOD = ["apple_pie", "baby_back_ribs", "baklava"]
SUN = [
    ("a/abbey", "abbey"),
    ("a/apartment_building/outdoor", "outdoor apartment_building"),
    ("b/bakery/shop", "shop bakery"),
]
DTD = ["banded", "blotchy", "braided", "bubbly"]
EUROSAT = [
    ("AnnualCrop", "Annual Crop Land"),
    ("Forest", "Forest"),
    ("HerbaceousVegetation", "Herbaceous Vegetation Land"),
    ("Highway", "Highway or Road"),
]
# (folder = split action, CamelCase action in UCF101's file names; HandstandPushups files say HandStand)
UCF = [
    ("Apply_Eye_Makeup", "ApplyEyeMakeup"),
    ("Apply_Lipstick", "ApplyLipstick"),
    ("Handstand_Pushups", "HandStandPushups"),
]
AIRCRAFT = ["707-320", "727-200", "F-16A/B", "Falcon 2000"]

MINI_CLASSNAMES: dict[str, list[str]] = {
    "imagenet": list(IMAGENET_WNIDS.values()),
    "caltech101": [c for _, c in CALTECH],
    "oxford_pets": [c for _, c in PETS],
    "stanford_cars": ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan"],
    "oxford_flowers": FLOWERS,
    "food101": FOOD,
    "fgvc_aircraft": AIRCRAFT,
    "sun397": [c for _, c in SUN],
    "dtd": DTD,
    "eurosat": [c for _, c in EUROSAT],
    "ucf101": [f for f, _ in UCF],
    "imagenet_v2": list(IMAGENET_WNIDS.values()),
    "imagenet_sketch": list(IMAGENET_WNIDS.values()),
    "imagenet_a": [IMAGENET_WNIDS[w] for w in IMAGENET_A_WNIDS],
    "imagenet_r": [IMAGENET_WNIDS[w] for w in IMAGENET_R_WNIDS],
}
ALL_NAMES = tuple(MINI_CLASSNAMES)

_JPEG_CACHE: dict[int, bytes] = {}


def jpeg_bytes(label: int) -> bytes:
    """An 8x8 JPEG with a colour per label (cached)."""
    if label not in _JPEG_CACHE:
        rng = np.random.default_rng(label)
        colour = rng.integers(0, 256, size=3, dtype=np.uint8)
        arr = np.broadcast_to(colour, (8, 8, 3)).copy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        _JPEG_CACHE[label] = buf.getvalue()
    return _JPEG_CACHE[label]


def write_image(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(label))


def _sizes(label: int) -> tuple[int, int, int]:
    return TRAIN_SIZES[label % len(TRAIN_SIZES)], VAL_SIZES[label % len(VAL_SIZES)], TEST_SIZES[label % len(TEST_SIZES)]


def _interleave(entries: list[list]) -> list[list]:
    """Round-robin over labels (stable), as split lists need not be grouped by class."""
    counters: dict[int, int] = {}
    keyed = []
    for e in entries:
        n = counters.get(e[1], 0)
        counters[e[1]] = n + 1
        keyed.append((n, e[1], e))
    return [e for _, _, e in sorted(keyed, key=lambda t: (t[0], t[1]))]


def write_zhou(
    dataset_dir: Path, image_dir: str, split_file: str, classes: list[tuple[Callable[[int], str], str]]
) -> None:
    """Images and a split_zhou JSON: `classes` holds (index -> impath relative to image_dir, class name) per label."""
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (path_fn, classname) in enumerate(classes):
        n_train, n_val, n_test = _sizes(label)
        i = 0
        for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for _ in range(n):
                impath = path_fn(i)
                write_image(dataset_dir / image_dir / impath, label)
                split[part].append([impath, label, classname])
                i += 1
    split = {k: _interleave(v) for k, v in split.items()}
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / split_file).write_text(json.dumps(split, indent=1))


def _caltech(root: Path) -> None:
    d = root / "caltech-101"
    for folder in CALTECH_IGNORED:  # on disk but not in the split
        write_image(d / "101_ObjectCategories" / folder / "image_0001.jpg", 99)
    write_zhou(
        d,
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        [(lambda i, f=f: f"{f}/image_{i + 1:04d}.jpg", c) for f, c in CALTECH],
    )


def _pets(root: Path) -> None:
    d = root / "oxford_pets"
    (d / "annotations").mkdir(parents=True, exist_ok=True)
    write_zhou(d, "images", "split_zhou_OxfordPets.json", [(lambda i, f=f: f"{f}_{i + 1}.jpg", c) for f, c in PETS])


def _cars(root: Path) -> None:
    from scipy.io import savemat

    d = root / "stanford_cars"
    counter = iter(range(1, 10_000))
    classes = []
    for label, name in enumerate(MINI_CLASSNAMES["stanford_cars"]):
        n_train, n_val, _ = _sizes(label)

        def path_fn(i: int, n_trainval: int = n_train + n_val) -> str:
            return f"cars_train/{next(counter):05d}.jpg" if i < n_trainval else f"cars_test/{next(counter):05d}.jpg"

        classes.append((path_fn, name))
    write_zhou(d, "", "split_zhou_StanfordCars.json", classes)
    meta = np.empty((1, len(CARS_DEVKIT)), dtype=object)
    for i, n in enumerate(CARS_DEVKIT):
        meta[0, i] = n
    (d / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(str(d / "devkit" / "cars_meta.mat"), {"class_names": meta})


def _flowers(root: Path) -> None:
    d = root / "oxford_flowers"
    counter = iter(range(1, 10_000))
    write_zhou(
        d, "jpg", "split_zhou_OxfordFlowers.json", [(lambda i: f"image_{next(counter):05d}.jpg", c) for c in FLOWERS]
    )
    (d / "cat_to_name.json").write_text(json.dumps({str(i + 1): c for i, c in enumerate(FLOWERS)}))


def _food(root: Path) -> None:
    write_zhou(
        root / "food-101",
        "images",
        "split_zhou_Food101.json",
        [(lambda i, c=c: f"{c}/{1000 + i}.jpg", c) for c in FOOD],
    )


def _sun(root: Path) -> None:
    write_zhou(
        root / "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        [(lambda i, p=p: f"{p}/sun_{i:04d}.jpg", c) for p, c in SUN],
    )


def _dtd(root: Path) -> None:
    write_zhou(
        root / "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        [(lambda i, c=c: f"{c}/{c}_{i + 1:04d}.jpg", c) for c in DTD],
    )


def _eurosat(root: Path) -> None:
    write_zhou(
        root / "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        [(lambda i, f=f: f"{f}/{f}_{i + 1}.jpg", c) for f, c in EUROSAT],
    )


def _ucf(root: Path) -> None:
    write_zhou(
        root / "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        [(lambda i, f=f, a=a: f"{f}/v_{a}_g{i + 1:02d}_c01.jpg", f) for f, a in UCF],
    )


def _aircraft(root: Path) -> None:
    d = root / "fgvc_aircraft"
    d.mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    image_id = 1_000_000
    for label, variant in enumerate(AIRCRAFT):
        for part, n in zip(("train", "val", "test"), _sizes(label)):
            for _ in range(n):
                image_id += 7
                write_image(d / "images" / f"{image_id}.jpg", label)
                lines[part].append(f"{image_id} {variant}")
    for part, ls in lines.items():
        (d / f"images_variant_{part}.txt").write_text("\n".join(ls) + "\n")
    (d / "families.txt").write_text("Boeing\n")


def _classnames_txt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in sorted(IMAGENET_WNIDS.items())))


def _imagenet(root: Path) -> None:
    d = root / "imagenet"
    _classnames_txt(d / "classnames.txt")
    for label, wnid in enumerate(sorted(IMAGENET_WNIDS)):
        n_train, _, n_test = _sizes(label)
        for i in range(n_train):
            write_image(d / "images" / "train" / wnid / f"{wnid}_{i + 1}.JPEG", label)
        for i in range(n_test):
            write_image(d / "images" / "val" / wnid / f"ILSVRC2012_val_{label * 10 + i + 1:08d}.JPEG", label)


def _imagenet_v2(root: Path) -> None:
    d = root / "imagenetv2"
    _classnames_txt(d / "classnames.txt")
    for label in range(len(IMAGENET_WNIDS)):
        for i in range(_sizes(label)[2]):
            write_image(d / "imagenetv2-matched-frequency-format-val" / str(label) / f"{label:03d}{i}abc.jpeg", label)


def _imagenet_sketch(root: Path) -> None:
    d = root / "imagenet-sketch"
    _classnames_txt(d / "classnames.txt")
    for label, wnid in enumerate(sorted(IMAGENET_WNIDS)):
        for i in range(_sizes(label)[2]):
            write_image(d / "images" / wnid / f"sketch_{i + 1}.JPEG", label)


def _imagenet_ar(root: Path, folder: str, image_dir: str, wnids: Iterable[str]) -> None:
    d = root / folder
    _classnames_txt(d / "classnames.txt")
    (d / image_dir).mkdir(parents=True, exist_ok=True)
    (d / image_dir / "README.txt").write_text("200 ImageNet classes\n")
    for label, wnid in enumerate(sorted(wnids)):
        for i in range(_sizes(label)[2] + 1):
            write_image(d / image_dir / wnid / f"{i:04d}.jpg", label)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "imagenet": _imagenet,
    "caltech101": _caltech,
    "oxford_pets": _pets,
    "stanford_cars": _cars,
    "oxford_flowers": _flowers,
    "food101": _food,
    "fgvc_aircraft": _aircraft,
    "sun397": _sun,
    "dtd": _dtd,
    "eurosat": _eurosat,
    "ucf101": _ucf,
    "imagenet_v2": _imagenet_v2,
    "imagenet_sketch": _imagenet_sketch,
    "imagenet_a": lambda root: _imagenet_ar(root, "imagenet-adversarial", "imagenet-a", IMAGENET_A_WNIDS),
    "imagenet_r": lambda root: _imagenet_ar(root, "imagenet-rendition", "imagenet-r", IMAGENET_R_WNIDS),
}


def build_miniature(root: Path | str, names: Iterable[str] | None = None) -> Path:
    """Write miniature trees of the given datasets (default: all 15) under `root`; returns `root` as a Path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in names or ALL_NAMES:
        BUILDERS[name](root)
    return root


def copy_miniature(src: Path, dst: Path) -> Path:
    """A copy of a built miniature tree (tests that damage a tree work on a copy of a shared one)."""
    shutil.copytree(src, dst)
    return dst
