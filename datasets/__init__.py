"""Dataset specs of the CoOp-layout benchmark (registered in `mugcp_bench.registry.DATASETS`), few-shot sampling,
base/novel split and checks. Importing this package registers every built-in dataset."""

from mugcp_bench.datasets import fgvc_aircraft, imagenet, toy, zhou_json  # noqa: F401  (register the built-ins)
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
    "get_spec",
    "prepare",
    "require_datasets",
    "subsample_classes",
]
