"""Dataset specs of the CoOp-layout benchmark (registered in `mugcp_bench.registry.DATASETS`), few-shot sampling,
base/novel split and checks. Importing this package imports every module in it, so a new dataset is one new file
here that registers its spec (see CONTRIBUTING.md)."""

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
from mugcp_bench.registry import import_submodules


def import_dataset_modules() -> list[str]:
    """Import every module of this package (each registers the specs it defines); the names imported."""
    return import_submodules(__name__, __path__)


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
