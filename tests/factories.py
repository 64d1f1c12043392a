"""The one factory of fake run records for tests and fixture stores: typed records (`store.records.Record`) written
through the store's own `RunRecord`, so a fake record is exactly what a run writes, only with chosen numbers.

    key = make_key(method="coop", train_dataset="dtd", seed=1)
    write_record(root, make_record(key, evaluations=[evaluation("base2novel", "dtd", "base", 71.2, n=100)]))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from mugcp_bench.registry import METHODS
from mugcp_bench.store.records import Evaluation, Record, RunKey, RunRecord, RunStatus

DEFAULT_KEY = {
    "train_protocol": "base2novel",
    "method": "coop",
    "variant": "",
    "recipe": "paper",
    "backbone": "ViT-B-16",
    "pretrained": "openai",
    "weights": "fixture",
    "train_dataset": "dtd",
    "classes": "base",
    "shots": 16,
    "seed": 1,
    "precision": "fp32",
    "config_hash": "",
}


def make_key(**fields: Any) -> RunKey:
    """A RunKey with the defaults above; `config_hash` defaults to a digest of the other fields."""
    values = {**DEFAULT_KEY, **fields}
    if not values["config_hash"]:
        blob = json.dumps({k: v for k, v in values.items() if k != "config_hash"}, sort_keys=True)
        values["config_hash"] = hashlib.sha1(blob.encode()).hexdigest()[8:20]
    return RunKey(**values)


def accuracy_of(target: float, n: int) -> float:
    """The accuracy of round(target% of n) correct predictions out of n (what an evaluation can measure)."""
    return 100.0 * round(target * n / 100.0) / n


def evaluation(
    protocol: str, dataset: str, classes: str, accuracy: float, n: int, exact: bool = False, **fields: Any
) -> Evaluation:
    """An evaluation of `n` test images; `accuracy` is rounded to a count of correct images unless `exact`."""
    acc = accuracy if exact else accuracy_of(accuracy, n)
    return Evaluation(
        protocol=protocol,
        dataset=dataset,
        classes=classes,
        n=n,
        accuracy=round(acc, 6),
        accuracy_1dp=round(acc, 1),
        **fields,
    )


def make_record(
    key: RunKey,
    status: RunStatus | str = RunStatus.COMPLETE,
    evaluations: list[Evaluation] = (),
    reason: str | None = None,
    **fields: Any,
) -> Record:
    """A record as the run job writes it: the method's display (order, colour) and its recipe's provenance from the
    method class when the method is registered, and any other field given."""
    rec = Record.new(key)
    rec.status, rec.reason, rec.evaluations = RunStatus(status), reason, list(evaluations)
    rec.versions = {"mugcp_bench": "0.1.0"}
    if key.method in METHODS:
        cls = METHODS.get(key.method)
        rec.display = {"order": cls.report_order, "color": cls.color}
        source = cls.provenance.get(key.recipe)
        rec.provenance = source.for_protocol(key.train_protocol) if source is not None else None
    return dataclasses.replace(rec, **fields)


def write_record(root: Path, rec: Record) -> Path:
    """Write `rec` under the results root `root` as the store lays it out; returns the run directory."""
    handle = RunRecord(root, rec.key)
    handle.rec = rec
    handle.dir.mkdir(parents=True, exist_ok=True)
    handle.save(stamp=False)  # fixture stores stay byte-identical when regenerated
    return handle.dir


def run_dir(root: Path, key: RunKey) -> Path:
    """Where the store keeps the run of `key` under `root`."""
    return RunRecord(root, key).dir


__all__ = ["accuracy_of", "evaluation", "make_key", "make_record", "run_dir", "write_record"]
