"""The results store: one directory per run with an atomically written run.json (schema 1).

``<results>/runs/<train_protocol>/<dataset>/<method>[-variant]/<backbone>/shots<K>/seed<S>-<id8>/run.json``
holds the key, resolved config, versions, status (running / complete / failed + reason), timings, trainable
parameter count and every evaluation. The tidy table is always rebuilt from these files, so nothing needs locking.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
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

    @property
    def id(self) -> str:
        fields = asdict(self)
        if fields["activation"] == "gelu":  # the field came later: runs built with GELU keep their earlier ids
            del fields["activation"]
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


def versions() -> dict[str, str]:
    import open_clip
    import torch

    import mugcp_bench

    out = {
        "mugcp_bench": mugcp_bench.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
    return out


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
    """A run directory and its run.json. `problem` says why an existing run.json could not be used (then `data`
    starts empty; `start` keeps the old file aside as run.json.corrupt, or run.json.schema<N> for a foreign one)."""

    def __init__(self, results_dir: Path, key: RunKey) -> None:
        self.key = key
        self.dir = Path(results_dir) / key.relative_dir()
        self.path = self.dir / "run.json"
        data, self.problem = load_record(self.path)
        self.data: dict[str, Any] = data or {}

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
        s = self.data.get("status")
        return RunStatus.NEW if s is None else RunStatus(s)

    def evaluations(self) -> list[dict[str, Any]]:
        return list(self.data.get("evaluations", []))

    def has_evaluation(self, protocol: str, dataset: str, classes: str) -> bool:
        return any(
            (e["protocol"], e["dataset"], e["classes"]) == (protocol, dataset, classes) for e in self.evaluations()
        )

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
    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")

    def start(self, config: dict[str, Any], trainable_params: int, eval_batch_size: int) -> None:
        self._keep_aside()
        created = self.data.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.data.update(
            {
                "schema": SCHEMA,
                "id": self.key.id,
                "status": RunStatus.RUNNING.value,
                "reason": None,
                "key": asdict(self.key),
                "method_label": self.key.method_label,
                "config": config,
                "versions": versions(),
                "trainable_params": trainable_params,
                "eval_batch_size": eval_batch_size,
                "created": created,
            }
        )
        self.data.setdefault("timings", {})
        self.data.setdefault("evaluations", [])
        self.save()

    def add_evaluation(self, evaluation: dict[str, Any]) -> None:
        evs = [
            e
            for e in self.evaluations()
            if (e["protocol"], e["dataset"], e["classes"])
            != (evaluation["protocol"], evaluation["dataset"], evaluation["classes"])
        ]
        evs.append(evaluation)
        self.data["evaluations"] = evs
        self.save()

    def finish(self, status: RunStatus = RunStatus.COMPLETE, reason: str | None = None) -> None:
        self.data["status"] = RunStatus(status).value
        self.data["reason"] = reason
        self.data.pop("owner", None)  # written by records of earlier versions
        self.save()


def iter_run_files(results_dir: Path) -> list[Path]:
    return sorted((Path(results_dir) / RUNS).glob("**/run.json"))
