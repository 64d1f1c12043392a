"""Published reference numbers (package data `mugcp_bench/report/published.csv`) with their provenance.

One row per number: method, protocol, dataset, metric, value, source, table, confidence, read_off_plot.
Provenance and the transcription rules: results/reference/README.md.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd

from mugcp_bench.protocols import PROTOCOLS
from mugcp_bench.report.tidy import dataset_key

log = logging.getLogger(__name__)

COLUMNS = ["method", "protocol", "dataset", "metric", "value", "source", "table", "confidence", "read_off_plot"]
METRICS = ("base", "novel", "hm", "acc", "avg_base", "avg_novel", "avg_hm", "avg")
CONFIDENCES = ("verified", "transcribed", "low")
# Marker printed next to a published value (results/reference/README.md): verified, transcribed, low confidence.
CONFIDENCE_MARKERS = {"verified": "✓", "transcribed": "T", "low": "L"}
AVERAGE = "average"

# Our method names that mean a row of the published tables ("CLIP" = zero-shot CLIP with one template).
_METHOD_ALIASES = {"clip": "zsclip", "zeroshot": "zsclip", "zeroshotclip": "zsclip", "zsclip": "zsclip"}


def published_csv_path() -> Path:
    """Location of the packaged CSV (works for editable and regular installs)."""
    return Path(str(resources.files("mugcp_bench.report") / "published.csv"))


def published_method(method: str) -> str:
    """Name under which `method` appears in the published CSV (zero-shot CLIP aliases map to 'zsclip')."""
    return _METHOD_ALIASES.get(re.sub(r"[^0-9a-z]", "", method.lower()), method.lower())


def validate(frame: pd.DataFrame) -> None:
    """Raise ValueError when the published table breaks its own schema (columns, vocabularies, duplicates)."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"published.csv lacks columns {missing}")
    for col, allowed in (("protocol", tuple(PROTOCOLS)), ("metric", METRICS), ("confidence", CONFIDENCES)):
        bad = sorted(set(frame[col]) - set(allowed))
        if bad:
            raise ValueError(f"published.csv: unknown {col} values {bad}")
    dup = frame.duplicated(["method", "protocol", "dataset", "metric"])
    if dup.any():
        raise ValueError(f"published.csv: duplicate numbers {frame.loc[dup, ['method', 'protocol', 'dataset']].values}")


@lru_cache(maxsize=4)
def _load(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"value": float}, keep_default_na=False)
    frame["read_off_plot"] = frame["read_off_plot"].astype(str).str.lower().isin(["true", "1", "yes"])
    validate(frame)
    frame["dataset_key"] = [AVERAGE if d == AVERAGE else dataset_key(d) for d in frame["dataset"]]
    return frame


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """The published numbers as a DataFrame (COLUMNS plus `dataset_key`, the canonical dataset name)."""
    return _load(str(path or published_csv_path())).copy()


def lookup(frame: pd.DataFrame, method: str, protocol: str, dataset: str, metric: str) -> pd.Series | None:
    """The published row for one number, or None."""
    key = AVERAGE if dataset == AVERAGE else dataset_key(dataset)
    hit = frame[
        (frame["method"] == published_method(method))
        & (frame["protocol"] == protocol)
        & (frame["dataset_key"] == key)
        & (frame["metric"] == metric)
    ]
    return None if hit.empty else hit.iloc[0]
