"""FGVCAircraft: the official `images_variant_{train,val,test}.txt` splits of fgvc-aircraft-2013b
(docs/protocol.md §1.1).

Lines are "<image id> <variant name>" (split on the first space; names such as "Boeing 717" hold spaces), images are
`images/<id>.jpg`, labels are line indices in `variants.txt`, class names the variant strings verbatim.
"""

from __future__ import annotations

from pathlib import Path

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
from mugcp_bench.datasets.zhou_json import COOP_DATASETS_MD, REHOSTED

SPLIT_FILES = {part: f"images_variant_{part}.txt" for part in ("train", "val", "test")}


def read_lines(path: Path) -> list[str]:
    """Non-blank lines with trailing whitespace removed."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n").strip() for line in f if line.strip()]


class FGVCAircraftSpec(DatasetSpec):
    name = "fgvc_aircraft"
    folder = "fgvc_aircraft"
    image_dir = "images"
    template = "a photo of a {}, a type of aircraft."
    display_name = "FGVCAircraft"
    aliases = ("fgvcaircraft", "aircraft", "fgvc")
    roles = ("base2novel", "cross_dataset", "few_shot")
    order = 6
    homepage = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
    source = (
        f"Download {homepage}, extract it, keep only fgvc-aircraft-2013b/data/ and rename it to "
        f"$DATA/fgvc_aircraft/ (see {COOP_DATASETS_MD}#fgvcaircraft).\n{REHOSTED}"
    )

    def tree_lines(self) -> list[tuple[str, str]]:
        return [
            ("images/", "<image id>.jpg"),
            ("variants.txt", "one variant per line; label = line index (100 classes)"),
            *[(f, "lines '<image id> <variant>'") for f in SPLIT_FILES.values()],
            ("...", "the other .txt files of fgvc-aircraft-2013b/data/"),
        ]

    def read(self, root: Path) -> SplitData:
        d = self._require_folder(root)
        self._require_dir(d / self.image_dir, "image folder")
        variants = read_lines(self._require_file(d / "variants.txt", "class list"))
        label_of = {v: i for i, v in enumerate(variants)}
        lists: dict[str, list[Datum]] = {}
        for part, filename in SPLIT_FILES.items():
            path = self._require_file(d / filename)
            items = []
            for lineno, line in enumerate(read_lines(path), 1):
                image_id, _, variant = line.partition(" ")
                if not variant or variant not in label_of:
                    raise DatasetProblem(
                        "malformed",
                        f"dataset {self.name}: line {lineno} of {path} ('{line[:60]}') does not name a variant of "
                        "variants.txt; re-extract fgvc-aircraft-2013b/data/",
                    )
                relpath = rel_to_root(self.folder, self.image_dir, f"{image_id}.jpg")
                items.append(make_datum(root, relpath, label_of[variant], variant))
            lists[part] = items
        classnames = classnames_by_label(lists["train"], self.name, SPLIT_FILES["train"])
        if classnames != variants[: len(classnames)] or len(classnames) != len(variants):
            raise DatasetProblem(
                "malformed",
                f"dataset {self.name}: {SPLIT_FILES['train']} does not cover all {len(variants)} variants of "
                "variants.txt; re-extract fgvc-aircraft-2013b/data/",
            )
        return SplitData(
            name=self.name, train=lists["train"], val=lists["val"], test=lists["test"], classnames=classnames
        )


FGVC_AIRCRAFT = FGVCAircraftSpec()
register_dataset(FGVC_AIRCRAFT)
