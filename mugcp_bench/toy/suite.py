"""The toy suite: procedural datasets mirroring the real benchmark, written to disk in CoOp layout.

- `toy_objects` (the ImageNet role): 48 colour x shape compositions. Its classes are ordered so that the base half
  (first 24 labels) and the novel half both contain every colour and every shape: novel classes are unseen
  *compositions* of seen words. It is shot under warm light, which the toy CLIP never sees in pretraining: a
  dataset-level shift that prompt learning can adapt to and zero-shot cannot.
- five targets with other class semantics: shapes, colours, textures (the DTD role), backgrounds (scenes), counts;
- four test-only shifted domains of the source, same label space (the ImageNet-V2/Sketch/A/R role):
  sketch, noisy, textured (texture swap), cartoon (another rendering style).

On disk, each dataset folder holds `images/<class_dir>/<split>_<i>.png`, `split_zhou_<Name>.json` ({"train", "val",
"test"} lists of [impath relative to images/, label, classname], the real JSON datasets' schema) and
`metadata.jsonl` (one line per image: its path relative to the dataset folder and every scene attribute).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mugcp_bench.toy.render import (
    BACKGROUND_POOL,
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    PATTERNS,
    SHAPES,
    Scene,
    describe,
    render,
    sample_scene,
)
from mugcp_bench.toy.workers import RenderPool

log = logging.getLogger(__name__)

IMAGE_DIR = "images"
METADATA_FILE = "metadata.jsonl"

SOURCE_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
SOURCE_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
# The source's object surfaces: mostly plain (weights by repetition); the 'textured' domain swaps in loud patterns.
SOURCE_PATTERNS = ("plain", "plain", "plain", "striped", "dotted")
SWAP_PATTERNS = ("checkered", "zigzag", "grid", "wavy", "speckled")
MOSTLY_PLAIN = ("plain", "plain", *PATTERNS[1:])
SCENE_BACKGROUNDS = tuple(b for b in BACKGROUNDS if b != "plain")


def _source_classnames() -> tuple[str, ...]:
    """Colour x shape names; base half first (colour index + shape index even), each half in a fixed shuffle."""
    pairs = [(ci, si) for ci in range(len(SOURCE_COLORS)) for si in range(len(SOURCE_SHAPES))]
    order = np.random.default_rng(20240611).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    base = [p for p in shuffled if (p[0] + p[1]) % 2 == 0]
    novel = [p for p in shuffled if (p[0] + p[1]) % 2 == 1]
    return tuple(f"{SOURCE_COLORS[c]} {SOURCE_SHAPES[s]}" for c, s in base + novel)


@dataclass(frozen=True)
class ToyDataset:
    """One toy dataset: its class semantics (which scene attribute the label fixes) and how scenes are drawn."""

    name: str  # registry name and folder name
    split_name: str  # split_zhou_<split_name>.json
    classnames: tuple[str, ...]
    template: str  # hand-written zero-shot template
    attribute: str  # "color shape" | "shape" | "color" | "pattern" | "background" | "count"
    layout: str = "object"
    style: str = "photo"
    source: str | None = None  # test-only shifted domains: the dataset whose label space they share
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    patterns: tuple[str, ...] = MOSTLY_PLAIN
    backgrounds: tuple[str, ...] = BACKGROUND_POOL
    lighting: str = "neutral"
    description: str = ""

    @property
    def test_only(self) -> bool:
        return self.source is not None

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.split_name}.json"

    def class_dir(self, label: int) -> str:
        return self.classnames[label].replace(" ", "_")

    def class_attributes(self, label: int) -> dict:
        """The scene attributes fixed by a label."""
        name = self.classnames[label]
        if self.attribute == "color shape":
            color, shape = name.split(" ")
            return {"color": color, "shape": shape}
        if self.attribute == "count":
            return {"count": COUNT_WORDS.index(name.split(" ")[0]) + 1}
        return {self.attribute: name}

    def label_of(self, scene: Scene) -> int | None:
        """The label whose class attributes the scene has, or None."""
        for label in range(len(self.classnames)):
            attrs = self.class_attributes(label)
            if all((scene.count if k == "count" else getattr(scene, k)) == v for k, v in attrs.items()):
                return label
        return None

    def sample(self, label: int, rng: np.random.Generator) -> Scene:
        """A random scene of class `label`."""
        return sample_scene(
            rng,
            layout=self.layout,
            style=self.style,
            colors=self.colors,
            shapes=self.shapes,
            patterns=self.patterns,
            backgrounds=self.backgrounds,
            lighting=self.lighting,
            **self.class_attributes(label),
        )

    def prompt(self, label: int) -> str:
        return self.template.format(self.classnames[label])


_SOURCE = ToyDataset(
    "toy_objects",
    "ToyObjects",
    _source_classnames(),
    "a photo of a {}.",
    "color shape",
    colors=SOURCE_COLORS,
    shapes=SOURCE_SHAPES,
    patterns=SOURCE_PATTERNS,
    lighting="warm",
    description="48 colour x shape compositions under warm light (the ImageNet role)",
)


def _domain(name: str, split_name: str, style: str, description: str, **kw) -> ToyDataset:
    return ToyDataset(
        name,
        split_name,
        _SOURCE.classnames,
        _SOURCE.template,
        "color shape",
        style=style,
        source=_SOURCE.name,
        colors=SOURCE_COLORS,
        shapes=SOURCE_SHAPES,
        patterns=kw.pop("patterns", SOURCE_PATTERNS),
        description=description,
        **kw,
    )


DATASETS: dict[str, ToyDataset] = {
    d.name: d
    for d in (
        _SOURCE,
        ToyDataset(
            "toy_shapes",
            "ToyShapes",
            SHAPES,
            "a photo of a {}, a type of shape.",
            "shape",
            description=f"{len(SHAPES)} shapes in any colour",
        ),
        ToyDataset(
            "toy_colors",
            "ToyColors",
            tuple(COLORS),
            "a photo of a {} object.",
            "color",
            description=f"{len(COLORS)} colours of any shape",
        ),
        ToyDataset(
            "toy_textures",
            "ToyTextures",
            PATTERNS,
            "a {} texture.",
            "pattern",
            layout="texture",
            description=f"{len(PATTERNS)} surface patterns filling the frame (the DTD role)",
        ),
        ToyDataset(
            "toy_scenes",
            "ToyScenes",
            SCENE_BACKGROUNDS,
            "a photo of a {} background.",
            "background",
            layout="scene",
            description=f"{len(SCENE_BACKGROUNDS)} backgrounds, each sharing the view with another (the SUN397 role)",
        ),
        ToyDataset(
            "toy_counts",
            "ToyCounts",
            tuple(f"{w} object" if w == "one" else f"{w} objects" for w in COUNT_WORDS),
            "a photo of {}.",
            "count",
            layout="count",
            description="one to six identical small objects",
        ),
        _domain("toy_objects_sketch", "ToyObjectsSketch", "sketch", "outline sketches of the source classes"),
        _domain("toy_objects_noisy", "ToyObjectsNoisy", "noisy", "the source classes under heavy pixel noise"),
        _domain(
            "toy_objects_textured",
            "ToyObjectsTextured",
            "textured",
            "texture swap: loud surface patterns on loud two-colour backgrounds",
            patterns=SWAP_PATTERNS,
        ),
        _domain("toy_objects_cartoon", "ToyObjectsCartoon", "cartoon", "flat cartoon rendering with outlines"),
    )
}

# The protocol module's view of the suite (names are registry names; the source comes first in base2novel).
TOY_SUITE: dict = {
    "source": "toy_objects",
    "base2novel": ["toy_objects", "toy_shapes", "toy_colors", "toy_textures", "toy_scenes", "toy_counts"],
    "cross_dataset_targets": ["toy_shapes", "toy_colors", "toy_textures", "toy_scenes", "toy_counts"],
    "domain_targets": ["toy_objects_sketch", "toy_objects_noisy", "toy_objects_textured", "toy_objects_cartoon"],
}


@dataclass(frozen=True)
class SuiteSizes:
    """Images per class and split (test-only domains render `test` per class)."""

    train: int = 48
    val: int = 8
    test: int = 24


FULL_SIZES = SuiteSizes()
QUICK_SIZES = SuiteSizes(train=16, val=4, test=4)


def _image_rng(seed: int, dataset: str, split: str, label: int, index: int) -> np.random.Generator:
    """Independent stream per image: the same image whatever else is rendered or in which order."""
    key = [seed, zlib.crc32(dataset.encode()), zlib.crc32(split.encode()), label, index]
    return np.random.default_rng(key)


def _splits(ds: ToyDataset, sizes: SuiteSizes) -> dict[str, int]:
    return {"test": sizes.test} if ds.test_only else {"train": sizes.train, "val": sizes.val, "test": sizes.test}


def count_images(sizes: SuiteSizes, names: list[str] | None = None) -> int:
    """How many images `write_suite` renders."""
    return sum(len(DATASETS[n].classnames) * sum(_splits(DATASETS[n], sizes).values()) for n in names or DATASETS)


def _render_class(folder: str, name: str, split: str, label: int, n: int, seed: int) -> tuple[list[list], list[str]]:
    """Render images 0..n-1 of one class and split into `folder`; returns their split-list entries and metadata
    lines (a task of its own, for worker processes)."""
    ds = DATASETS[name]
    entries, meta_lines = [], []
    for i in range(n):
        scene = ds.sample(label, _image_rng(seed, ds.name, split, label, i))
        impath = f"{ds.class_dir(label)}/{split}_{i:04d}.png"
        Image.fromarray(render(scene), "RGB").save(Path(folder) / IMAGE_DIR / impath, format="PNG")
        entries.append([impath, label, ds.classnames[label]])
        record = {
            "path": f"{IMAGE_DIR}/{impath}",
            "split": split,
            "label": label,
            "classname": ds.classnames[label],
            "caption": describe(scene),
            **scene.metadata(),
        }
        meta_lines.append(json.dumps(record, sort_keys=True))
    return entries, meta_lines


def write_dataset(
    ds: ToyDataset,
    root: Path,
    sizes: SuiteSizes,
    seed: int,
    advance: Callable[[int], None] | None = None,
    pool: RenderPool | None = None,
) -> None:
    """Render one dataset into `root/<ds.name>/` (images, split JSON, metadata.jsonl); `pool` spreads its classes
    over worker processes (same files either way)."""
    folder = Path(root) / ds.name
    lists: dict[str, list] = {"train": [], "val": [], "test": []}
    meta_lines: list[str] = []
    for label in range(len(ds.classnames)):
        (folder / IMAGE_DIR / ds.class_dir(label)).mkdir(parents=True, exist_ok=True)
    # Split lists are label-major so few-shot grouping sees labels in order.
    tasks = [
        (str(folder), ds.name, split, label, n)
        for split, n in _splits(ds, sizes).items()
        for label in range(len(ds.classnames))
    ]
    results = (pool or RenderPool(0)).imap(_render_class, [(*task, seed) for task in tasks])
    for (_, _, split, _, n), (entries, lines) in zip(tasks, results):
        lists[split] += entries
        meta_lines += lines
        if advance is not None:
            advance(n)
    if ds.test_only:  # the reference loaders of test-only sets use the data as both train and test
        lists["train"] = list(lists["test"])
    with open(folder / ds.split_file, "w", encoding="utf-8") as f:
        json.dump(lists, f)
    with open(folder / METADATA_FILE, "w", encoding="utf-8") as f:
        f.write("\n".join(meta_lines) + "\n")


def write_suite(
    root: Path,
    sizes: SuiteSizes = FULL_SIZES,
    seed: int = 0,
    advance: Callable[[int], None] | None = None,
    workers: int = 0,
) -> None:
    """Render every toy dataset under `root` (deterministic in `seed`; `workers` render processes, 0: this one)."""
    with RenderPool(workers) as pool:
        for ds in DATASETS.values():
            write_dataset(ds, root, sizes, seed, advance, pool)


def load_scene_metadata(dataset_folder: str | Path) -> dict[str, dict]:
    """Scene attributes of every image of a rendered toy dataset, keyed by the image path relative to the dataset
    folder (posix, e.g. "images/red_circle/train_0003.png").

    Each record holds shape, color, pattern, background, size, style, layout, count, position (None when several
    objects), centers, radius, rotation, noise_seed, split, label, classname and a full `caption`.
    """
    path = Path(dataset_folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: scene metadata exists only for rendered toy datasets")
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                out[record.pop("path")] = record
    return out


__all__ = [
    "DATASETS",
    "FULL_SIZES",
    "QUICK_SIZES",
    "TOY_SUITE",
    "SuiteSizes",
    "ToyDataset",
    "count_images",
    "load_scene_metadata",
    "write_dataset",
    "write_suite",
]
