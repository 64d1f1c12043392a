"""Fast checks of dataset folders before any training (the library side of `mugcp-bench check-data`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from mugcp_bench.datasets.base import CheckResult, DatasetSpec
from mugcp_bench.errors import UserError
from mugcp_bench.protocols import spec_rank
from mugcp_bench.registry import DATASETS


def dataset_names(selection: str | Iterable[str] = "all", group: str = "benchmark") -> list[str]:
    """Registry names from "all" (every dataset of `group`, in the specs' table order), a group name ("benchmark",
    "toy"), "a,b" or a list of names.

    Unknown names raise UserError with a did-you-mean; aliases map to their registered name; duplicates are dropped.
    """
    if isinstance(selection, str):
        parts = [p.strip() for p in selection.split(",") if p.strip()]
    else:
        parts = [p.strip() for p in selection if p.strip()]
    if not parts:
        raise UserError("no dataset given; pass --datasets all or a comma-separated list of names")
    groups: dict[str, list[str]] = {}
    for n, spec in sorted(DATASETS.items(), key=lambda item: spec_rank(item[1])):
        groups.setdefault(spec.group, []).append(n)
    names: list[str] = []
    for part in parts:
        key = part.lower()
        if key == "all":
            found = groups.get(group, [])
        elif key in groups and key not in DATASETS:
            found = groups[key]  # a group name such as "benchmark" or "toy"
        else:
            found = [DATASETS.canonical(part)]
        names += [n for n in found if n not in names]
    return names


def require_data_root(root: Path) -> Path:
    """The data root as an absolute path; UserError if it is not a folder."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"data root {os.path.abspath(root)} is a file, not a folder; pass --data-root DIR (the folder)")
    if os.path.isdir(root) and not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"data root {os.path.abspath(root)} is not readable (permission denied); fix its permissions")
    if not os.path.isdir(root):
        raise UserError(
            f"data root {os.path.abspath(root)} does not exist; pass --data-root DIR or set MUGCP_DATA "
            "('mugcp-bench check-data' lists the expected folders)"
        )
    return Path(os.path.abspath(root))


def check_datasets(
    root: Path,
    names: str | Iterable[str] = "all",
    decode: bool = False,
    workers: int = 4,
    progress: Callable[[str, int], None] | None = None,
) -> list[CheckResult]:
    """Check every requested dataset (folder, split files, JSON, listed files present and not empty, class names);
    opens no image unless `decode` (then every listed image is decoded by `workers` threads; progress(dataset, n)).

    UserError for a missing data root or an unknown name; dataset problems are returned, not raised.
    """
    root = require_data_root(root)
    results = []
    for name in dataset_names(names):
        spec: DatasetSpec = DATASETS.get(name)
        step = (lambda n, name=name: progress(name, n)) if progress else None
        try:
            results.append(spec.check(root, decode=decode, workers=workers, progress=step))
        except OSError as e:  # an unreadable folder or file anywhere under the root: a problem of this dataset
            where = e.filename or root / spec.folder
            message = f"{name}: cannot read {where} ({e.strerror}); fix its permissions"
            folder = root / spec.folder
            results.append(CheckResult(name, spec.folder, str(folder), "unreadable", message))
    return results


def require_datasets(root: Path, names: str | Iterable[str]) -> None:
    """UserError naming every unusable dataset (the `run` command calls this before training): the ones whose folder
    is missing in one line, with a --datasets of those present, then one line per other problem."""
    results = check_datasets(root, names)
    missing = [r.name for r in results if r.status == "missing folder"]
    present = [r.name for r in results if r.ok]
    problems = [r.message for r in results if not r.ok and r.status != "missing folder"]
    if missing:
        line = (
            next(r.message for r in results if r.status == "missing folder")
            if len(missing) == 1
            else f"{len(missing)} of {len(results)} datasets are not under {require_data_root(root)} "
            f"({', '.join(missing)}): 'mugcp-bench check-data --datasets {','.join(missing)}' shows where each comes "
            "from and its expected tree"
        )
        if present:
            line += f"; to run the ones present: --datasets {','.join(present)}"
        problems.insert(0, line)
    if problems:
        raise UserError("\n".join(problems))
