"""Per-image predictions of one evaluation, stored beside run.json: what the report's bootstrap intervals, paired
tests, per-class accuracy and confusion matrices are computed from.

`<run dir>/predictions/<protocol>-<dataset>-<classes>.npz` holds `pred` (argmax label), `label` (true label), `top5`
(the top-k labels, best first, k = min(5, classes)) in the smallest unsigned integer type that fits, and `classnames`.
The file is a zip written byte-for-byte reproducibly (fixed timestamps) and atomically; the evaluation record
references it with its SHA-256 and the SHA-256 of the test list it was computed on (images and labels in order), so
two methods' predictions are paired only when they scored the same images.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mugcp_bench.atomic import atomic_path

DIRNAME = "predictions"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: same predictions -> same bytes


class PredictionsError(ValueError):
    """A predictions file is missing, damaged, or not the one its record names."""


@dataclass
class Predictions:
    """The per-image predictions of one evaluation."""

    pred: np.ndarray  # (N,) predicted labels
    label: np.ndarray  # (N,) true labels
    top5: np.ndarray | None  # (N, k) top-k labels, best first
    classnames: list[str]

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: top-1 prediction is the true label."""
        return self.pred == self.label


def items_sha256(items: Sequence[Any]) -> str:
    """SHA-256 of a test list (relative path and label of every image, in order): equal lists, equal hashes."""
    h = hashlib.sha256()
    for d in items:
        h.update(f"{d.relpath}\t{d.label}\n".encode())
    return h.hexdigest()


def file_name(protocol: str, dataset: str, classes: str) -> str:
    return f"{protocol}-{dataset}-{classes}.npz"


def _smallest_uint(n_classes: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def encode(pred: np.ndarray, label: np.ndarray, top5: np.ndarray | None, classnames: Sequence[str]) -> bytes:
    """The .npz bytes (deflated, fixed timestamps: reproducible)."""
    dtype = _smallest_uint(max(len(classnames), 1))
    arrays = {"pred": np.asarray(pred).astype(dtype), "label": np.asarray(label).astype(dtype)}
    if top5 is not None and np.asarray(top5).ndim == 2 and np.asarray(top5).shape[1] > 1:
        arrays["top5"] = np.asarray(top5).astype(dtype)
    arrays["classnames"] = np.asarray(list(classnames), dtype=str)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def write(
    run_dir: Path,
    protocol: str,
    dataset: str,
    classes: str,
    result: dict[str, Any],
    items: Sequence[Any],
    classnames: Sequence[str],
) -> dict[str, str]:
    """Write the predictions of `trainer.evaluate`'s `result` on `items`; returns the record's reference to them."""
    label = np.array([d.label for d in items], dtype=np.int64)
    data = encode(result["predictions"], label, result.get("top5"), classnames)
    rel = f"{DIRNAME}/{file_name(protocol, dataset, classes)}"
    with atomic_path(Path(run_dir) / rel) as tmp:
        tmp.write_bytes(data)
    return {"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "test_sha256": items_sha256(items)}


def read(path: str | Path, sha256: str | None = None) -> Predictions:
    """Load a predictions file, checking its SHA-256 when given; PredictionsError when it is not usable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PredictionsError(f"predictions file {path} cannot be read ({e.strerror or e})") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise PredictionsError(f"predictions file {path} does not match the SHA-256 its run.json records")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            pred, label = z["pred"].astype(np.int64), z["label"].astype(np.int64)
            top5 = z["top5"].astype(np.int64) if "top5" in z.files else None
            classnames = [str(c) for c in z["classnames"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise PredictionsError(f"predictions file {path} is damaged ({type(e).__name__}: {e})") from None
    if pred.shape != label.shape:
        raise PredictionsError(f"predictions file {path}: {pred.shape[0]} predictions for {label.shape[0]} labels")
    return Predictions(pred=pred, label=label, top5=top5, classnames=classnames)
