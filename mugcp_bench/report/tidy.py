"""Run records (`runs/**/run.json`) -> a tidy pandas table, one row per run x evaluation; dataset display names.

The store is read as plain JSON files (schema 1, written by the trainer); nothing here imports the trainer.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mugcp_bench.datasets.base import title_case
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DATASETS
from mugcp_bench.store.records import Evaluation, Record, RunStatus, load_record

log = logging.getLogger(__name__)

RUN_GLOB = "runs/**/run.json"

KEY_COLUMNS = [
    "train_protocol",
    "method",
    "variant",
    "method_label",
    "recipe",
    "backbone",
    "pretrained",
    "activation",
    "origin",
    "train_dataset",
    "shots",
    "seed",
    "precision",
]
EVAL_COLUMNS = ["eval_protocol", "eval_dataset", "classes", "n", "accuracy", "accuracy_1dp", "leakage"]
TIDY_COLUMNS = ["run_id", "status", *KEY_COLUMNS, *EVAL_COLUMNS]
# Not part of the documented tidy schema, kept at the end: needed to resolve duplicate runs of one seed, and the
# per-image predictions behind an evaluation (absolute path, its SHA-256, the SHA-256 of the test list it scored).
EXTRA_COLUMNS = [
    "config_hash",
    "config",  # the run's method and training settings, canonical JSON (`report --by-config` names entries by them)
    "overrides",  # the user's settings that made the run differ from its recipe ("lr=0.01, n_ctx=16"; "" if none)
    "path",
    "mtime",
    "n_classes",
    "predictions",
    "predictions_sha256",
    "test_sha256",
    "report_order",  # the method's place in the tables and its plot colour, as the run recorded them
    "color",
    "provenance",  # where the run's recipe comes from: "repo@commit:config" ("" for recipes of our own design)
]
# What a run cost (the efficiency table): parameters, timings, throughput, peak memory and device.
COST_COLUMNS = [
    "trainable_params",
    "epochs",
    "n_train",
    "train_s",
    "train_images_per_s",
    "eval_s",
    "eval_images_per_s",
    "n_eval_images",
    "peak_memory_mb",
    "memory_measure",
    "device",
    "device_name",
]
RUN_COLUMNS = [
    "run_id",
    "status",
    "reason",
    *KEY_COLUMNS,
    "config_hash",
    "config",
    "overrides",
    "path",
    "mtime",
    "report_order",
    "color",
    "provenance",
    *COST_COLUMNS,
]
# One row per run x training epoch; loss parts appear as loss_<part> columns after these.
HISTORY_COLUMNS = ["run_id", *KEY_COLUMNS, "epoch", "loss", "lr", "images_per_s", "seconds"]


# ---------------------------------------------------------------------------------------------------------------
# Dataset names: read off the registered dataset specs (`DatasetSpec.display_name`, `aliases`, `order`), so a dataset
# added in one file gets its name and place in every table. Names no spec knows (a plugin not installed here) keep
# their own spelling, title-cased, after the known ones.
# ---------------------------------------------------------------------------------------------------------------
def _normalise(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _spec_index() -> dict[str, tuple[str, object]]:
    """Normalised spelling -> (registry name, spec) for every registered dataset name and alias."""
    index: dict[str, tuple[str, object]] = {}
    for name, spec in DATASETS.items():
        for spelling in (name, *spec.aliases):
            index.setdefault(_normalise(spelling), (name, spec))
    return index


def _lookup(name: str) -> tuple[str, object] | None:
    return _spec_index().get(_normalise(name))


def dataset_key(name: str) -> str:
    """Registry name of a known dataset (any usual spelling: "OxfordPets", "imagenet-sketch"), else the name
    lower-cased."""
    hit = _lookup(name)
    return hit[0] if hit else name.lower()


def dataset_display(name: str) -> str:
    """The spec's display name ("OxfordPets", "-Sketch"); unknown names are title-cased ("Toy Shapes")."""
    hit = _lookup(name)
    return hit[1].label if hit else title_case(name)


def dataset_rank(name: str, first_seen: int = 0) -> tuple[int, int, str, float]:
    """Sort key: datasets that declare a table order by suite (the benchmark first) and that order, then the others
    in order of first appearance."""
    hit = _lookup(name)
    if hit and hit[1].order is not None:
        return (0, int(hit[1].group != "benchmark"), hit[1].group, hit[1].order)
    return (1, 0, "", first_seen)


# ---------------------------------------------------------------------------------------------------------------
# Reading the store
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Results:
    """What a results directory holds: one row per run (any status), one row per run x evaluation."""

    results_dir: Path
    runs: pd.DataFrame
    tidy: pd.DataFrame
    unreadable: list[Path] = field(default_factory=list)
    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HISTORY_COLUMNS))

    def status_counts(self) -> dict[str, int]:
        """Number of runs per status ("complete", "running", "failed", ...)."""
        return {str(k): int(v) for k, v in self.runs["status"].value_counts().sort_index().items()}

    def complete(self) -> pd.DataFrame:
        """Tidy rows of complete runs only (the only ones tables use)."""
        return self.tidy[self.tidy["status"] == "complete"].reset_index(drop=True)


def find_run_files(results_dir: Path) -> list[Path]:
    """Every run.json under `<results_dir>/runs`, sorted by path."""
    return sorted(Path(results_dir).glob(RUN_GLOB))


def read_run(path: Path) -> dict | None:
    """One run record, or None with one warning line when it is damaged (`store.load_record`'s rule). A record of
    another schema version is a UserError naming it: a report never drops runs silently."""
    record, problem = load_record(Path(path))
    if problem is not None and problem.kind == "schema":
        raise UserError(
            f"{problem.line()}: upgrade mugcp-bench to report it, or move its run directory out of the results"
        )
    if problem is not None:
        log.warning("skipping unreadable run record %s (`mugcp-bench run` trains it again)", problem.line())
    return record


def _key_fields(rec: Record) -> dict:
    key = rec.key
    return {
        "train_protocol": key.train_protocol or None,
        "method": key.method,
        "variant": key.variant,
        "method_label": rec.method_label,
        "recipe": key.recipe or None,
        "backbone": key.backbone or None,
        "pretrained": key.pretrained or None,
        # Omitted from keys built with GELU (and from records older than the field): the same weights under QuickGELU
        # are another setting, never averaged with a GELU run.
        "activation": key.activation or "gelu",
        "origin": key.origin or "trained",
        "train_dataset": key.train_dataset or None,
        "shots": key.shots,
        "seed": key.seed,
        "precision": key.precision or None,
    }


def _config_json(rec: Record) -> str:
    """The run's method and training settings as one flat canonical JSON object (their keys never overlap)."""
    flat = {**(rec.config.get("method") or {}), **(rec.config.get("train") or {})}
    return json.dumps(flat, sort_keys=True, default=str)


def _display_fields(rec: Record) -> dict:
    display = rec.display or {}
    source = rec.provenance or {}
    where = ""
    if source.get("repo"):
        where = source["repo"] + (f"@{source['commit']}" if source.get("commit") else "")
        where += f":{source['config']}" if source.get("config") else ""
    elif source.get("note"):
        where = source["note"]
    order = display.get("order")
    return {"report_order": float(order) if order is not None else np.nan, "color": display.get("color"),
            "provenance": where}  # fmt: skip


def _float(value: object) -> float:
    return float(value) if value is not None else np.nan


def _predictions_fields(path: Path, ev: Evaluation) -> dict:
    ref = ev.predictions if isinstance(ev.predictions, dict) else {}
    rel = ref.get("file")
    file = None
    if isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
        file = str(Path(path).parent / rel)  # beside run.json, never outside its run directory
    return {"predictions": file, "predictions_sha256": ref.get("sha256"), "test_sha256": ref.get("test_sha256")}


def _cost_fields(rec: Record) -> dict:
    timings, resources, history = rec.timings, rec.resources, rec.history
    epochs = len(history) if history else (rec.config.get("train") or {}).get("epochs")
    return {
        "trainable_params": rec.trainable_params,
        "epochs": epochs,
        "n_train": rec.n_train,
        "train_s": _float(timings.get("train_s")),
        "train_images_per_s": _float(timings.get("train_images_per_s")),
        "eval_s": _float(timings.get("eval_s")),
        "eval_images_per_s": _float(timings.get("eval_images_per_s")),
        "n_eval_images": sum(int(ev.n or 0) for ev in rec.evaluations),
        "peak_memory_mb": _float(resources.get("peak_memory_mb")),
        "memory_measure": resources.get("memory_measure"),
        "device": resources.get("device"),
        "device_name": resources.get("device_name"),
    }


def _history_rows(rec: Record, key: dict) -> list[dict]:
    rows = []
    for epoch in rec.history:
        if isinstance(epoch, dict) and "epoch" in epoch:
            rows.append({"run_id": rec.id, **key, **{k: v for k, v in epoch.items() if k != "run_id"}})
    return rows


def records_to_frames(records: list[tuple[Path, dict | Record]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, tidy) frames from (path, record) pairs."""
    runs, tidy, _ = records_to_tables(records)
    return runs, tidy


def records_to_tables(
    records: list[tuple[Path, dict | Record]],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(runs, tidy, history) frames from (path, record) pairs (typed records, or run.json contents)."""
    run_rows, eval_rows, history_rows = [], [], []
    for path, raw in records:
        rec = raw if isinstance(raw, Record) else Record.from_dict(raw)
        keys = _key_fields(rec)
        base = {"run_id": rec.id, "status": RunStatus(rec.status).value, **keys}
        extra = {
            "config_hash": rec.key.config_hash or None,
            "config": _config_json(rec),
            "overrides": ", ".join(f"{k}={v}" for k, v in sorted(rec.overrides.items())),
            "path": str(path),
            "mtime": path.stat().st_mtime if path.exists() else np.nan,
            **_display_fields(rec),
        }
        run_rows.append({**base, "reason": rec.reason, **extra, **_cost_fields(rec)})
        history_rows += _history_rows(rec, {**keys, "color": extra["color"]})
        for ev in rec.evaluations:
            eval_rows.append(
                {
                    **base,
                    "eval_protocol": ev.protocol,
                    "eval_dataset": ev.dataset,
                    "classes": ev.classes,
                    "n": ev.n,
                    "accuracy": _float(ev.accuracy),
                    "accuracy_1dp": _float(ev.accuracy_1dp),
                    "leakage": _float(ev.leakage),
                    **extra,
                    "n_classes": ev.n_classes,
                    **_predictions_fields(path, ev),
                }
            )
    runs = pd.DataFrame(run_rows, columns=RUN_COLUMNS)
    tidy = pd.DataFrame(eval_rows, columns=TIDY_COLUMNS + EXTRA_COLUMNS)
    history = pd.DataFrame(history_rows)
    history = history.reindex(
        columns=[*HISTORY_COLUMNS, *sorted(c for c in history.columns if c not in HISTORY_COLUMNS)]
    )
    for frame in (runs, tidy, history):
        for col in ("shots", "seed"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    tidy["n"] = pd.to_numeric(tidy["n"], errors="coerce").astype("Int64")
    # accuracy_1dp is what the reference parser reads from the log; fill it from the full value if absent.
    tidy["accuracy_1dp"] = tidy["accuracy_1dp"].fillna(tidy["accuracy"].round(1))
    return runs, tidy, history


def load_results(results_dir: str | Path) -> Results:
    """Read every run record under `results_dir`. UserError when the folder is missing or holds no runs."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(
            f"results directory '{results_dir}' does not exist: run 'mugcp-bench run' first or pass --results-dir"
        )
    paths = find_run_files(results_dir)
    if not paths:
        raise UserError(
            f"no results in '{results_dir}' (no {RUN_GLOB}): run 'mugcp-bench run' first or pass --results-dir"
        )
    records, unreadable = [], []
    for path in paths:
        record = read_run(path)
        if record is None:
            unreadable.append(path)
        else:
            records.append((path, record))
    if not records:
        raise UserError(f"no readable run records in '{results_dir}' ({len(unreadable)} unreadable run.json files)")
    runs, tidy, history = records_to_tables(records)
    log.info("read %d run records from %s (%d evaluations)", len(runs), results_dir, len(tidy))
    return Results(results_dir=results_dir, runs=runs, tidy=tidy, unreadable=unreadable, history=history)
