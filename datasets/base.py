"""Core data types of the datasets layer, Dassl-identical few-shot sampling, base/novel split and the image Dataset.

Rules: docs/protocol.md §1 (layout, split schema, few-shot sampling, base/novel split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mugcp_bench.atomic import atomic_write_text
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DATASETS, suggest

log = logging.getLogger(__name__)

SUBSETS = ("all", "base", "new")
SUBSET_ALIASES = {"novel": "new"}


@dataclass(frozen=True)
class Datum:
    """One image of a split list."""

    impath: str  # absolute path
    label: int
    classname: str  # cleaned; underscores may remain (prompts replace them by spaces)
    relpath: str  # path relative to the data root, posix separators: a stable id for caches


@dataclass
class SplitData:
    """The train / val / test lists of one dataset, with class names ordered by label."""

    name: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    # ImageNet: the val list is the test list and few-shot sampling leaves it alone (docs/protocol.md §1.5 step 4).
    val_is_test: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class CheckResult:
    """Outcome of a dataset check (no image is opened unless the check decodes them)."""

    name: str
    folder: str
    path: str  # absolute dataset folder
    status: str  # "OK", "missing folder", "missing split file", "N images missing|empty|unreadable", "malformed", …
    message: str = ""  # one line naming the problem and the fix; empty when OK
    num_classes: int | None = None
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    expected_tree: str = ""
    source: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"


class DatasetProblem(UserError):
    """A dataset on disk is unusable; `status` is the short label shown by check-data."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def rel_to_root(*parts: str) -> str:
    """A posix path relative to the data root from path components (empty components are skipped)."""
    return "/".join(p.strip("/").replace(os.sep, "/") for p in parts if p and p.strip("/"))


def make_datum(root: Path, relpath: str, label: int, classname: str) -> Datum:
    """A Datum whose absolute path is the (absolute, unresolved) data root joined with `relpath`."""
    return Datum(
        impath=os.path.join(os.path.abspath(root), *relpath.split("/")),
        label=label,
        classname=classname,
        relpath=relpath,
    )


def classnames_by_label(items: Sequence[Datum], dataset: str, where: str) -> list[str]:
    """Class names ordered by label, from a list whose labels must be 0..max contiguous with one name each.

    n_cls = max label + 1 as in Dassl's `get_num_classes`; a gap or a label with two names is a malformed split.
    """
    if not items:
        raise DatasetProblem("malformed", f"dataset {dataset}: {where} has no images; re-download the split file")
    names: dict[int, str] = {}
    for d in items:
        seen = names.setdefault(d.label, d.classname)
        if seen != d.classname:
            raise DatasetProblem(
                "malformed",
                f"dataset {dataset}: label {d.label} has two class names ('{seen}' and '{d.classname}') in {where}; "
                "re-download the split file",
            )
    n_cls = max(names) + 1
    missing = [y for y in range(n_cls) if y not in names]
    if min(names) < 0 or missing:
        bad = min(names) if min(names) < 0 else missing[0]
        raise DatasetProblem(
            "malformed",
            f"dataset {dataset}: labels in {where} are not 0..{n_cls - 1} contiguous (label {bad}); "
            "re-download the split file",
        )
    return [names[y] for y in range(n_cls)]


@dataclass
class FileScan:
    """What one `stat` per listed file found: how many are missing or empty (0 bytes), and the first of each."""

    n_total: int = 0
    n_missing: int = 0
    n_empty: int = 0
    first_missing: str = ""
    first_empty: str = ""


def scan_files(items: Iterable[Datum]) -> FileScan:
    """Missing and empty (0-byte) files among a list of data: one `os.stat` per file, no image is opened."""
    scan = FileScan()
    for d in items:
        scan.n_total += 1
        try:
            size = os.stat(d.impath).st_size
        except FileNotFoundError:
            scan.n_missing += 1
            scan.first_missing = scan.first_missing or d.impath
            continue
        if size == 0:
            scan.n_empty += 1
            scan.first_empty = scan.first_empty or d.impath
    return scan


# What opening and decoding a bad image file raises (PIL: OSError for missing and truncated files, its
# UnidentifiedImageError for non-images, ValueError / SyntaxError for some malformed headers).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


def read_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The image at `path`, fully decoded as RGB (truncated files fail here, not later); raises one of IMAGE_ERRORS.
    The one way images are read: the training and test loader, `check-data --decode` and the describers."""
    with Image.open(path) as im:
        return im.convert("RGB")


def decode_problem(path: str) -> str | None:
    """Why the image at `path` cannot be used (missing, empty, not an image, truncated), or None if it decodes."""
    try:
        if os.stat(path).st_size == 0:
            return "empty (0 bytes)"
        read_rgb(path)
    except FileNotFoundError:
        return "missing"
    except IMAGE_ERRORS as e:
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def decode_images(
    items: Sequence[Datum], workers: int = 4, progress: Callable[[int], None] | None = None
) -> list[tuple[str, str]]:
    """(path, reason) of every listed image that does not decode, in list order; `workers` threads decode at once
    (PIL releases the GIL while decoding); progress(n) after every image."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [d.impath for d in items]
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, reason in zip(paths, pool.map(decode_problem, paths, chunksize=64)):
            if reason is not None:
                bad.append((path, reason))
            if progress:
                progress(1)
    return bad


def title_case(name: str) -> str:
    """ "toy_shapes" -> "Toy Shapes": the display name of a dataset that declares none."""
    return " ".join(part.capitalize() if part.islower() else part for part in re.split(r"[_\-\s]+", name) if part)


class DatasetSpec:
    """How one dataset lives on disk; registered in `mugcp_bench.registry.DATASETS` by lowercase name.

    Subclasses implement `read(root)` (the raw split lists, raising DatasetProblem) and `tree_lines()`.
    """

    name: str = ""
    folder: str = ""
    template: str = "a photo of a {}."  # hand-written zero-shot template (docs/protocol.md §5.1)
    test_only: bool = False
    label_space: str | None = None
    source: str = ""  # where the data comes from, multi-line instructions
    homepage: str = ""  # one URL or phrase for one-line error messages
    # Names: the one place a dataset's spellings live (the registry, --datasets and the report read them here).
    display_name: str = ""  # as the paper tables print it ("OxfordPets", "-Sketch"); "" = the name in title case
    aliases: tuple[str, ...] = ()  # other spellings --datasets and the report accept ("pets", "flowers102")
    # Suite membership: the suite ("all" in --datasets selects the benchmark group; the toy world has its own), the
    # dataset's parts in that suite's protocols (`mugcp_bench.protocols.ROLES`) and its row in the report tables.
    group: str = "benchmark"
    roles: tuple[str, ...] = ()  # base2novel, source, cross_dataset, domain_generalization, few_shot
    order: float | None = None  # position in the suite's tables and `--datasets all` (None: after the ordered ones)

    @property
    def label(self) -> str:
        """The name report tables print."""
        return self.display_name or title_case(self.name)

    def dataset_dir(self, root: Path) -> Path:
        return Path(os.path.abspath(root)) / self.folder

    def tree_lines(self) -> list[tuple[str, str]]:
        """(relative path inside the dataset folder, comment) lines of the expected layout."""
        raise NotImplementedError

    def expected_tree(self) -> str:
        """Multi-line description of the expected layout under the data root."""
        lines = [f"$DATA/{self.folder}/"]
        entries = self.tree_lines()
        width = max((len(p) for p, _ in entries), default=0) + 4
        for i, (path, comment) in enumerate(entries):
            branch = "└── " if i == len(entries) - 1 else "├── "
            text = f"{branch}{path}"
            lines.append(f"{text:<{width + 4}}{'# ' + comment if comment else ''}".rstrip())
        return "\n".join(lines)

    def read(self, root: Path) -> SplitData:
        """Read the split lists (no existence checks of individual images); raise DatasetProblem on problems."""
        raise NotImplementedError

    def validate_classnames(self, root: Path, data: SplitData) -> str | None:
        """A one-line problem if the class names break the cleaning rules (docs/protocol.md §1.3), else None."""
        return None

    def _require_folder(self, root: Path) -> Path:
        if not os.path.isdir(root):
            raise UserError(f"data root {os.path.abspath(root)} does not exist; pass --data-root DIR or set MUGCP_DATA")
        d = self.dataset_dir(root)
        if not d.is_dir():
            raise DatasetProblem(
                "missing folder",
                f"dataset {self.name}: folder '{self.folder}' not found under {os.path.abspath(root)}; get it from "
                f"{self.homepage} and lay it out as 'mugcp-bench check-data --datasets {self.name}' shows",
            )
        return d

    def _require_file(self, path: Path, what: str = "split file") -> Path:
        if not path.is_file():
            raise DatasetProblem(
                "missing split file",
                f"dataset {self.name}: {what} {path} not found; get it from {self.homepage} "
                f"('mugcp-bench check-data --datasets {self.name}' shows the expected tree)",
            )
        return path

    def _require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise DatasetProblem(
                "missing folder",
                f"dataset {self.name}: {what} {path} not found; get it from {self.homepage} "
                f"('mugcp-bench check-data --datasets {self.name}' shows the expected tree)",
            )
        return path

    def load(self, root: Path) -> SplitData:
        """Read the split lists and make sure every listed image exists; UserError (one line) on problems."""
        data = self.read(root)
        self._require_images(data)
        return data

    def listed_images(self, data: SplitData) -> list[Datum]:
        """Every distinct image the split lists name (val left out where it is the test list or unused)."""
        lists = [data.train, data.test] if (self.test_only or data.val_is_test) else [data.train, data.val, data.test]
        seen: set[str] = set()
        return [d for items in lists for d in items if not (d.impath in seen or seen.add(d.impath))]

    def _require_images(self, data: SplitData) -> None:
        """Every listed file exists and is not empty (one stat each); DatasetProblem otherwise."""
        scan = scan_files(self.listed_images(data))
        fix = f"re-download or re-extract the images from {self.homepage}"
        if scan.n_missing:
            n = scan.n_missing
            raise DatasetProblem(
                f"{n} image{'s' if n != 1 else ''} missing",
                f"dataset {self.name}: {n} of {scan.n_total} listed images are missing (first: {scan.first_missing}); "
                f"{fix}",
            )
        if scan.n_empty:
            n = scan.n_empty
            raise DatasetProblem(
                f"{n} image{'s' if n != 1 else ''} empty",
                f"dataset {self.name}: {n} of {scan.n_total} listed images are empty files (0 bytes; first: "
                f"{scan.first_empty}); {fix}",
            )

    def _require_decodable(self, data: SplitData, workers: int, progress: Callable[[int], None] | None) -> None:
        """Every listed image decodes (opens every file: slow); DatasetProblem naming the first that does not."""
        items = self.listed_images(data)
        bad = decode_images(items, workers, progress)
        if bad:
            n, (path, reason) = len(bad), bad[0]
            raise DatasetProblem(
                f"{n} image{'s' if n != 1 else ''} unreadable",
                f"dataset {self.name}: {n} of {len(items)} listed images cannot be decoded (first: {path}: {reason}); "
                f"re-download or re-extract the images from {self.homepage}",
            )

    def check(
        self, root: Path, decode: bool = False, workers: int = 4, progress: Callable[[int], None] | None = None
    ) -> CheckResult:
        """Fast check: folder, split files, parse, every listed file exists and is not empty, class-name rules;
        with `decode`, also every listed image decodes (`workers` threads, progress(n) per image). Never raises
        DatasetProblem (a missing data root still raises UserError)."""
        result = CheckResult(
            name=self.name,
            folder=self.folder,
            path=str(self.dataset_dir(root)),
            status="OK",
            expected_tree=self.expected_tree(),
            source=self.source,
        )
        try:
            data = self.read(root)
            result.num_classes = data.num_classes
            result.num_train, result.num_val, result.num_test = len(data.train), len(data.val), len(data.test)
            self._require_images(data)
            problem = self.validate_classnames(root, data)
            if problem:
                raise DatasetProblem("bad class names", f"dataset {self.name}: {problem}")
            if decode:
                self._require_decodable(data, workers, progress)
        except DatasetProblem as e:
            result.status, result.message = e.status, str(e)
        return result


# --------------------------------------------------------------------------------------------- few-shot sampling


def _sample_per_label(items: Sequence[Datum], k: int, rng: random.Random) -> list[Datum]:
    """Dassl's `generate_fewshot_dataset` with repeat=False (Dassl.pytorch c61a1b5, base_dataset.py): groups in
    first-appearance label order, `sample(group, k)` if the group has >= k items, else the whole group."""
    groups: dict[int, list[Datum]] = {}
    for d in items:
        groups.setdefault(d.label, []).append(d)
    out: list[Datum] = []
    for group in groups.values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def split_hash(data: SplitData) -> str:
    """Content hash of the full split lists (relpath, label, class name), the few-shot cache key."""
    h = hashlib.sha256()
    for part in ("train", "val", "test"):
        h.update(f"\x00{part}\x00".encode())
        for d in getattr(data, part):
            h.update(f"{d.relpath}\t{d.label}\t{d.classname}\n".encode())
    return h.hexdigest()


def fewshot_cache_path(cache_dir: Path, data: SplitData, shots: int, seed: int) -> Path:
    return Path(cache_dir) / "fewshot" / data.name / f"shot{shots}-seed{seed}-{split_hash(data)[:16]}.json"


def _read_cached_subset(path: Path, data: SplitData, shots: int, seed: int) -> tuple[list[Datum], list[Datum]] | None:
    """The cached (train, val) subsets, or None (with a warning) if the file is unreadable or does not fit."""
    try:
        with open(path) as f:
            obj = json.load(f)
        if obj.get("shots") != shots or obj.get("seed") != seed or obj.get("split_hash") != split_hash(data):
            raise ValueError("key mismatch")
        by_rel = {d.relpath: d for d in (*data.train, *data.val)}
        lists = []
        for part in ("train", "val"):
            items = []
            for relpath, label in obj[part]:
                d = by_rel[relpath]
                if d.label != label:
                    raise ValueError(f"label of {relpath} differs")
                items.append(d)
            lists.append(items)
        return lists[0], lists[1]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable few-shot cache %s (%s); sampling again", path, e)
        return None


def fewshot(data: SplitData, shots: int | None, seed: int, cache_dir: Path | None = None) -> SplitData:
    """k-shot subsets reproducing Dassl's for a given seed (docs/protocol.md §1.5).

    A local `random.Random(seed)` gives the same stream as Dassl's `random.seed(seed)` followed by `random.sample`
    (Dassl's `set_random_seed` runs just before the dataset is built; nothing draws in between). Train with k shots,
    then val with min(k, 4) shots on the same stream; with `val_is_test` (ImageNet) only train is sampled.
    Subsets are cached as JSON (paths relative to the data root) under cache_dir/fewshot/<dataset>/.
    """
    if not shots or shots < 1:
        return data
    cache = fewshot_cache_path(cache_dir, data, shots, seed) if cache_dir is not None else None
    cached = _read_cached_subset(cache, data, shots, seed) if cache is not None and cache.exists() else None
    if cached is not None:
        train, val = cached
        if data.val_is_test:
            val = data.val
    else:
        rng = random.Random(seed)
        train = _sample_per_label(data.train, shots, rng)
        val = data.val if data.val_is_test else _sample_per_label(data.val, min(shots, 4), rng)
        if cache is not None:
            obj = {
                "dataset": data.name,
                "shots": shots,
                "seed": seed,
                "split_hash": split_hash(data),
                "train": [[d.relpath, d.label] for d in train],
                "val": [] if data.val_is_test else [[d.relpath, d.label] for d in val],
            }
            try:
                atomic_write_text(cache, json.dumps(obj))
            except OSError as e:
                log.warning("cannot write few-shot cache %s (%s)", cache, e)
    _warn_short_classes(data, shots)
    classnames = classnames_by_label(train, data.name, f"the {shots}-shot training list")
    return dataclasses.replace(data, train=train, val=val, classnames=classnames)


_WARNED_SHORT: set[tuple[str, int]] = set()


def _warn_short_classes(data: SplitData, shots: int) -> None:
    """Once per (dataset, shots) and process: how many classes have fewer training images than `shots` (they keep
    all they have, as Dassl's sampler does)."""
    counts: dict[int, int] = {}
    for d in data.train:
        counts[d.label] = counts.get(d.label, 0) + 1
    short = sum(1 for n in counts.values() if n < shots)
    if short and (data.name, shots) not in _WARNED_SHORT:
        _WARNED_SHORT.add((data.name, shots))
        least = min(counts.values())
        log.warning(
            "%s: %d of %d classes have fewer than %d training images (the smallest has %d); they keep all they have, "
            "as Dassl does",
            data.name,
            short,
            len(counts),
            shots,
            least,
        )


def normalize_subset(subset: str) -> str:
    """'all' | 'base' | 'new' ('novel' is an alias); UserError with a did-you-mean otherwise."""
    key = SUBSET_ALIASES.get(subset.strip().lower(), subset.strip().lower())
    if key not in SUBSETS:
        raise UserError(
            f"unknown class subset '{subset}'.{suggest(key, [*SUBSETS, *SUBSET_ALIASES])} Use all, base or new."
        )
    return key


def subsample_classes(data: SplitData, subset: str) -> SplitData:
    """Base/novel split (docs/protocol.md §1.6): labels present in the (few-shot) train list, sorted; base = the first
    ceil(n/2), new = the rest; train, val and test are filtered and relabelled 0..m-1 in label order."""
    subset = normalize_subset(subset)
    if subset == "all":
        return data
    labels = sorted({d.label for d in data.train})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subset == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}

    def _filter(items: list[Datum]) -> list[Datum]:
        return [dataclasses.replace(d, label=relabel[d.label]) for d in items if d.label in relabel]

    return dataclasses.replace(
        data,
        train=_filter(data.train),
        val=_filter(data.val),
        test=_filter(data.test),
        classnames=[data.classnames[y] for y in selected],
    )


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a spec under its own name and aliases (the spec is the one place a dataset's names live)."""
    DATASETS.add(spec.name, spec, aliases=spec.aliases)
    return spec


def get_spec(name: str) -> DatasetSpec:
    """The registered spec for a dataset name (UserError with a did-you-mean for unknown names)."""
    return DATASETS.get(name)


def prepare(
    name: str, root: Path, shots: int | None, seed: int, subset: str = "all", cache_dir: Path | None = None
) -> SplitData:
    """spec.load -> fewshot (if shots) -> subsample_classes: the one call the trainer uses.

    Test-only sets (ImageNet variants) are returned whole: like the reference loaders, they ignore `shots`;
    a base/new subset of them is refused.
    """
    spec = get_spec(name)
    subset = normalize_subset(subset)
    data = spec.load(root)
    if spec.test_only:
        if subset != "all":
            raise UserError(
                f"dataset {spec.name} is test-only and is always evaluated on all its classes, not '{subset}'"
            )
        return data
    data = fewshot(data, shots, seed, cache_dir)
    return subsample_classes(data, subset)


# ------------------------------------------------------------------------------------------- the image dataset


class ImageReadError(UserError):
    """A listed image is missing or cannot be decoded (one line naming the file and the dataset).

    In a DataLoader worker, torch re-raises the error in the main process as `ImageReadError(<worker traceback>)`;
    the message is cut back to the original line so that the CLI still prints one line.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "\n" in message and marker in message:
            message = message.rstrip().rsplit(marker, 1)[-1]
        super().__init__(message)


class ImageListDataset:
    """(image tensor, label, index) for a list of Datum; a missing or corrupt image raises a one-line UserError.

    A map-style dataset as torch's DataLoader takes it (`__len__`, `__getitem__`); it does not import torch, so the
    datasets layer (names, splits, checks) stays light for the commands that never train."""

    def __init__(
        self, items: Sequence[Datum], transform: Callable[[Image.Image], Any] | None, dataset: str | None = None
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        d = self.items[index]
        try:
            image = read_rgb(d.impath)
        except IMAGE_ERRORS as e:
            which = f"dataset {self.dataset}" if self.dataset else f"dataset folder '{d.relpath.split('/', 1)[0]}'"
            reason = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__}: {e})"
            reason = " ".join(reason.split())  # one line
            raise ImageReadError(
                f"image {d.impath} of {which} is {reason}; re-download or re-extract it "
                "('mugcp-bench check-data' checks that every listed file exists)"
            ) from e
        if self.transform is not None:
            image = self.transform(image)
        return image, d.label, index


__all__ = [
    "CheckResult",
    "DatasetProblem",
    "DatasetSpec",
    "Datum",
    "ImageListDataset",
    "ImageReadError",
    "SplitData",
    "fewshot",
    "get_spec",
    "make_datum",
    "normalize_subset",
    "prepare",
    "split_hash",
    "subsample_classes",
    "title_case",
]
