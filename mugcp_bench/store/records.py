"""The results store: one directory per run with an atomically written run.json (schema 1).

``<results>/runs/<train_protocol>/<dataset>/<method>[-variant]/<backbone>/shots<K>/seed<S>-<id8>/run.json``
holds the key, resolved config, versions, status (running / complete / failed + reason), timings, trainable
parameter count and every evaluation. The tidy table is always rebuilt from these files, so nothing needs locking.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from mugcp_bench.atomic import atomic_write_text

SCHEMA = 1
RUNS = "runs"


# How a record's `resources.peak_memory_mb` was measured (`resources.memory_measure`), as the efficiency table says it.
CUDA_MAX_ALLOCATED = "cuda_max_allocated"  # torch.cuda.max_memory_allocated over the run (tensors only)
RSS_PEAK_ABOVE_START = "rss_peak_above_start"  # Linux: peak resident set of the process during the run - at start
RSS_MAXRSS_GROWTH = "rss_maxrss_growth"  # elsewhere: growth of the process's lifetime peak RSS (0 if it peaked before)
MEMORY_MEASURES = {
    CUDA_MAX_ALLOCATED: "torch.cuda.max_memory_allocated",
    RSS_PEAK_ABOVE_START: "peak process RSS above its start (CPU)",
    RSS_MAXRSS_GROWTH: "growth of the process's peak RSS (CPU; a lower bound)",
}


class RunStatus(str, Enum):
    """A run record's status. Whether a `running` record is being worked on is the claim's to say (store/claims.py):
    the one liveness rule."""

    NEW = "new"  # no record yet
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C; its checkpoint is kept and a rerun resumes

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RunKey:
    """Everything that makes two runs the same run. Evaluation targets are not part of it."""

    train_protocol: str
    method: str
    variant: str
    recipe: str
    backbone: str
    pretrained: str
    weights: str  # short hash of the backbone weights
    train_dataset: str
    classes: str  # "base" | "all"
    shots: int
    seed: int
    precision: str
    config_hash: str
    # The backbone's MLP activation as built ("quickgelu" | "gelu"): the same weights under another activation are
    # another model (open_clip 3.x built ViT-B-16 + openai with GELU before mugcp-bench forced QuickGELU).
    activation: str = "gelu"
    # "trained" here, or "imported": a checkpoint of the reference code evaluated in our harness (`mugcp-bench import`);
    # never the same run, nor the same report entry, as a trained run of otherwise the same key
    origin: str = "trained"

    @property
    def id(self) -> str:
        fields = asdict(self)
        if fields["activation"] == "gelu":  # the field came later: runs built with GELU keep their earlier ids
            del fields["activation"]
        if fields["origin"] == "trained":  # likewise: trained runs keep their ids
            del fields["origin"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:8]

    @property
    def method_label(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method

    def relative_dir(self) -> Path:
        safe_backbone = self.backbone.replace("/", "_")
        return (
            Path(RUNS)
            / self.train_protocol
            / self.train_dataset
            / self.method_label
            / safe_backbone
            / f"shots{self.shots}"
            / f"seed{self.seed}-{self.id}"
        )


def config_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def key_from_dict(d: dict[str, Any]) -> RunKey:
    """A RunKey from a record's `key` (fields a record of an earlier version lacks take their defaults)."""
    names = {f.name: f for f in fields(RunKey)}
    values = {k: v for k, v in d.items() if k in names}
    for name, f in names.items():
        if name not in values and f.default is MISSING:
            values[name] = 0 if name in ("shots", "seed") else ""
    return RunKey(**values)


# --- the record: what run.json holds, typed --------------------------------------------------------------------------
@dataclass(kw_only=True)
class Evaluation:
    """One evaluation of a run: a dataset's test split on a class subset, tagged with its protocol."""

    protocol: str  # base2novel | source | cross_dataset | domain_generalization | few_shot
    dataset: str
    split: str = "test"
    classes: str  # base | novel | all
    n_classes: int | None = None
    n: int
    accuracy: float  # % correct, full precision
    accuracy_1dp: float  # rounded to 1 decimal, as the reference code's log prints it
    leakage: float | None = None  # MuGCP: share of descriptions naming the true class
    eval_batch_size: int | None = None
    predictions: dict[str, Any] | None = None  # {"file", "sha256", "test_sha256"} of the per-image predictions

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values.setdefault("accuracy_1dp", round(float(values.get("accuracy", 0.0)), 1))
        return cls(**values)

    def target(self) -> tuple[str, str, str]:
        return (self.protocol, self.dataset, self.classes)


@dataclass(kw_only=True)
class Record:
    """A run record (run.json, schema 1): written by the run job through `RunRecord`, read by the report."""

    schema: int = SCHEMA
    id: str
    status: RunStatus = RunStatus.NEW
    reason: str | None = None
    key: RunKey
    method_label: str
    config: dict[str, Any] = field(default_factory=dict)  # {"method": {...}, "train": {...}, "transform": ...}
    # the user's settings (--set / --grid) that made this run differ from its recipe's; {} for the recipe's own run
    overrides: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    trainable_params: int | None = None
    eval_batch_size: int | None = None
    created: str | None = None
    updated: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # train_s, train_images_per_s, eval_s, eval_images_per_s
    evaluations: list[Evaluation] = field(default_factory=list)
    method_params: int | None = None  # every parameter the method holds, trainable or not
    display: dict[str, Any] | None = None  # {"order", "color"}: the method's place in tables and its plot colour
    provenance: dict[str, str] | None = None  # {"repo", "commit", "config", "note"} of the run's recipe
    imported: dict[str, Any] | None = None  # where an imported checkpoint came from (origin "imported")
    reconstructed: bool = False  # the method was reconstructed from a paper without code
    train_info: dict[str, Any] = field(default_factory=dict)  # what the method said about its training data
    n_train: int | None = None
    n_classes: int | None = None
    last_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, loss, loss_<part>, lr, ...
    resources: dict[str, Any] = field(default_factory=dict)  # peak_memory_mb, memory_measure, device, device_name
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every job that worked on it: action, host, pid
    traceback: str | None = None
    failure: dict[str, Any] | None = None  # a non-finite loss: where and what
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know, kept as they were

    @classmethod
    def new(cls, key: RunKey) -> Record:
        return cls(id=key.id, key=key, method_label=key.method_label)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        """The record of a run.json's content; tolerant of the fields earlier versions did not write."""
        names = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in names}
        key = key_from_dict(d.get("key") or {})
        values["key"] = key
        values["status"] = RunStatus(d.get("status") or RunStatus.NEW.value)
        values["evaluations"] = [Evaluation.from_dict(e) for e in d.get("evaluations") or []]
        values.setdefault("id", key.id)
        values.setdefault("method_label", key.method_label)
        for name in ("config", "overrides", "versions", "timings", "train_info", "resources"):
            values[name] = values.get(name) or {}
        for name in ("history", "attempts"):
            values[name] = values.get(name) or []
        extra = {k: v for k, v in d.items() if k not in names and k not in ("owner",)}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """run.json's content: every field in declaration order (unknown fields kept after them)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "key":
                value = asdict(value)
            elif f.name == "evaluations":
                value = [asdict(e) for e in value]
            elif f.name == "status":
                value = RunStatus(value).value
            out[f.name] = value
        return {**out, **self.extra}

    def evaluation(self, protocol: str, dataset: str, classes: str) -> Evaluation | None:
        return next((e for e in self.evaluations if e.target() == (protocol, dataset, classes)), None)

    def has_evaluation(self, protocol: str, dataset: str, classes: str) -> bool:
        return self.evaluation(protocol, dataset, classes) is not None


# --- reading records: one rule for `run` and `report` ----------------------------------------------------------------
# A damaged run.json (not JSON, not a record: a disk or copy accident; ours are written atomically) is retrained by
# `run` (the file is kept aside as run.json.corrupt) and left out of `report`, each with one warning line naming it.
# A record of another schema version is refused by both, with the upgrade (or, for `run`, --force) hint: never
# counted as done nor silently dropped.
@dataclass(frozen=True)
class RecordProblem:
    """Why a run.json cannot be used: `kind` damaged | schema, `what` the details."""

    path: Path
    kind: str
    what: str
    schema: Any = None

    def line(self) -> str:
        return f"{self.path}: {self.what}"


def load_record(path: Path) -> tuple[dict[str, Any] | None, RecordProblem | None]:
    """(record, None), (None, None) when there is no file, or (None, problem) for a damaged or foreign record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as e:
        return None, RecordProblem(path, "damaged", f"damaged run record ({type(e).__name__}: {e})")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty file" if not text.strip() else f"not valid JSON: {e}"
        return None, RecordProblem(path, "damaged", f"damaged run record ({what})")
    if not isinstance(record, dict) or "schema" not in record:
        what = f"a JSON {type(record).__name__}" if not isinstance(record, dict) else "no 'schema' field"
        return None, RecordProblem(path, "damaged", f"damaged run record ({what})")
    if record["schema"] != SCHEMA:
        what = f"run record schema {record['schema']!r}, this mugcp-bench reads schema {SCHEMA}"
        return None, RecordProblem(path, "schema", what, record["schema"])
    return record, None


class RunRecord:
    """A run directory and its run.json, read into a typed `Record` (`rec`). `problem` says why an existing run.json
    could not be used (then `rec` starts new; `start` keeps the old file aside as run.json.corrupt, or
    run.json.schema<N> for a foreign one)."""

    def __init__(self, results_dir: Path, key: RunKey) -> None:
        self.key = key
        self.dir = Path(results_dir) / key.relative_dir()
        self.path = self.dir / "run.json"
        data, self.problem = load_record(self.path)
        self.exists = data is not None
        self.rec = Record.from_dict(data) if data is not None else Record.new(key)

    def _keep_aside(self) -> None:
        if self.problem is None or not self.path.exists():
            return
        suffix = "corrupt" if self.problem.kind == "damaged" else f"schema{self.problem.schema}"
        os.replace(self.path, self.path.with_name(f"run.json.{suffix}"))
        self.problem = None

    # --- state ----------------------------------------------------------------------------------------------------
    @property
    def status(self) -> RunStatus:
        """The record's status (`RunStatus.NEW` when there is no record)."""
        return self.rec.status if self.exists else RunStatus.NEW

    def has_evaluation(self, protocol: str, dataset: str, classes: str) -> bool:
        return self.rec.has_evaluation(protocol, dataset, classes)

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    @property
    def log_path(self) -> Path:
        """What the run logged, every line prefixed with the run id (the Dassl habit: log.txt beside the record)."""
        return self.dir / "log.txt"

    # --- writes ---------------------------------------------------------------------------------------------------
    def save(self, stamp: bool = True) -> None:
        """Write run.json atomically (`stamp`: set `updated` to now)."""
        if stamp:
            self.rec.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = json.dumps(self.rec.to_dict(), indent=2, sort_keys=False, default=str) + "\n"
        atomic_write_text(self.path, text)
        self.exists = True

    def start(self, config: dict[str, Any], trainable_params: int, eval_batch_size: int, versions: dict) -> None:
        """The run begins (or resumes): status running, with its resolved config and the software versions."""
        self._keep_aside()
        rec = self.rec
        rec.schema, rec.id, rec.key, rec.method_label = SCHEMA, self.key.id, self.key, self.key.method_label
        rec.status, rec.reason = RunStatus.RUNNING, None
        rec.config, rec.versions = config, versions
        rec.trainable_params, rec.eval_batch_size = trainable_params, eval_batch_size
        rec.created = rec.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()

    def stage_import(self, source: dict[str, Any]) -> None:
        """Record a run whose model.pt was just written from an imported checkpoint: status new, no evaluations, and
        `imported` saying where it came from (path, sha256, reference trainer, epoch, ...)."""
        self._keep_aside()
        self.rec = Record.new(self.key)
        self.rec.imported = source
        self.rec.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()

    def add_evaluation(self, evaluation: Evaluation) -> None:
        """Add (or replace) the evaluation of one target and save."""
        self.rec.evaluations = [e for e in self.rec.evaluations if e.target() != evaluation.target()]
        self.rec.evaluations.append(evaluation)
        self.save()

    def finish(self, status: RunStatus = RunStatus.COMPLETE, reason: str | None = None) -> None:
        self.rec.status = RunStatus(status)
        self.rec.reason = reason
        self.save()


def iter_run_files(results_dir: Path) -> list[Path]:
    return sorted((Path(results_dir) / RUNS).glob("**/run.json"))
