"""Dataset specs of the CoOp-layout benchmark (registered in `mugcp_bench.registry.DATASETS`), few-shot sampling,
base/novel split and checks. Importing this package imports every module in it, so a new dataset is one new file
here that registers its spec (see CONTRIBUTING.md)."""

import importlib
import pkgutil

from mugcp_bench.datasets.base import (
    CheckResult,
    DatasetProblem,
    DatasetSpec,
    Datum,
    ImageListDataset,
    ImageReadError,
    SplitData,
    fewshot,
    get_spec,
    prepare,
    subsample_classes,
)
from mugcp_bench.datasets.checks import check_datasets, dataset_names, require_datasets
from mugcp_bench.datasets.zhou_json import ZhouJsonSpec


def import_dataset_modules() -> list[str]:
    """Import every module of this package (each registers the specs it defines); the names imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


import_dataset_modules()

__all__ = [
    "CheckResult",
    "DatasetProblem",
    "DatasetSpec",
    "Datum",
    "ImageListDataset",
    "ImageReadError",
    "SplitData",
    "ZhouJsonSpec",
    "check_datasets",
    "dataset_names",
    "fewshot",
    "import_dataset_modules",
    "get_spec",
    "prepare",
    "require_datasets",
    "subsample_classes",
]
