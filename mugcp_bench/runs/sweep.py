"""A sweep as a library call: options -> world -> plan -> execute -> summary. What `mugcp-bench run` and `ablate` call.

    from mugcp_bench import run_sweep

    result = run_sweep(methods="coop,maple", datasets="toy_shapes", seeds=[1, 2])
    df = result.table()          # tidy pandas DataFrame, one row per run x evaluation of this sweep

Everything is checked before the first run starts (bad input raises `UserError`); a failed run is recorded in its
run.json. Printing is the caller's: pass a `Reporter` to follow the plan and the runs (the CLI draws a progress bar).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mugcp_bench.engine.interrupts import StopFile, deferred_sigint
from mugcp_bench.errors import UserError
from mugcp_bench.runs.world import resolve_world
from mugcp_bench.store.claims import new_token

log = logging.getLogger(__name__)

DEFAULT_METHODS = "zsclip,coop,cocoop,maple,dcp,mugcp"


# --- parsing the option values (shared by the CLI and the Python API) ---------------------------------------------
def parse_ints(text: str | int | Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    """'1,2,3' or '1-3' (or an int, or a sequence of ints) -> a tuple of ints; None or '' -> None."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return (text,)
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"--{what} '{text}': expected comma-separated integers, e.g. 1,2,3 or 1-3") from None
    return tuple(out)


def parse_sets(sets: Sequence[str] | Mapping[str, Any]) -> dict[str, str]:
    """('epochs=2', 'n_ctx=8') or {'epochs': 2} -> {'epochs': '2', ...} (values are type-checked later)."""
    if isinstance(sets, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in sets.items()}
    out = {}
    for s in sets:
        if "=" not in s:
            raise UserError(f"--set '{s}': expected key=value, e.g. --set epochs=2")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_grid(grid: Sequence[str] | Mapping[str, Any]) -> dict[str, list[str]]:
    """('n_ctx=4,8', 'lr=0.002,0.01') or {'n_ctx': [4, 8]} -> {'n_ctx': ['4', '8'], ...}: the settings a sweep
    crosses (every combination is a run of its own; values are type-checked like --set)."""
    if isinstance(grid, Mapping):
        items = [(str(k), v if isinstance(v, (list, tuple)) else str(v).split(",")) for k, v in grid.items()]
    else:
        items = []
        for g in grid:
            if "=" not in g:
                raise UserError(f"--grid '{g}': expected key=v1,v2,..., e.g. --grid n_ctx=4,8,16")
            k, v = g.split("=", 1)
            items.append((k, v.split(",")))
    out: dict[str, list[str]] = {}
    for k, values in items:
        key, vals = k.strip(), [str(x).strip() for x in values]
        if not key or not vals or any(not x for x in vals):
            raise UserError(f"--grid {k}={','.join(vals)}: give a setting and one or more values, e.g. n_ctx=4,8")
        if key in out:
            raise UserError(f"--grid {key} is given twice; put all its values in one: --grid {key}=v1,v2")
        out[key] = list(dict.fromkeys(vals))
    return out


def check_writable(results_dir: Path) -> None:
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(
            f"results directory {results_dir} is not writable ({e.strerror}); pass --results-dir DIR"
        ) from None


def resolve_device(name: str) -> str:
    """'auto' -> cuda if available else cpu; 'cuda[:N]' only when CUDA is available."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device '{name}': use cpu, cuda, cuda:N or auto")
    return name


def _names(value: str | Sequence[str]) -> list[str]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in parts if p.strip()]


# --- options, progress, result ------------------------------------------------------------------------------------
@dataclass
class SweepOptions:
    """Everything a sweep takes; the CLI's options of `run`, with Python values accepted too (lists, dicts)."""

    methods: str | Sequence[str] = DEFAULT_METHODS
    variants: dict[str, list[str]] | None = None  # ablation: method -> components to drop (variant no-X each)
    protocols: str | Sequence[str] = "base2novel"
    datasets: str | Sequence[str] | None = None
    shots: str | int | Sequence[int] | None = None
    seeds: str | int | Sequence[int] = "1,2,3"
    data_root: str | Path | None = None
    backbone: str | None = None
    pretrained: str | None = None
    recipe: str | None = None
    results_dir: str | Path = "results"
    sets: Sequence[str] | Mapping[str, Any] = ()
    grid: Sequence[str] | Mapping[str, Any] = ()  # settings to cross: every combination is its own run
    dry_run: bool = False
    force: bool = False
    resume: bool = True
    keep_going: bool = False
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    no_describe: bool = False
    tensorboard: bool = False  # TensorBoard event files per run (needs the tensorboard package)
    quick_toy: bool = False
    executor: str = "local"  # local | gpus | ray (mugcp_bench.runs.executors)
    gpus: str | None = None  # gpus: "0,1,3" or "cpu:2" (default: every visible CUDA device)
    ray_address: str | None = None  # ray: "auto" or HOST:PORT (default: a local Ray instance)
    ray_gpus_per_run: float | None = None  # ray: GPUs per run task (default 1 on CUDA, 0 on the CPU)
    ray_cpus_per_run: float = 1.0
    claim_timeout: float = 120.0  # seconds without a heartbeat after which another process takes a run over


@dataclass
class SweepPlan:
    """What a sweep is about to do (given to `Reporter.planned`)."""

    counts: dict[str, int]
    backbone: str
    recipe: str
    device: str
    results_dir: Path
    labels: list[str]
    executor: str = "local"


@dataclass
class RunOutcome:
    """One planned run after the sweep: its action (skip/train/resume/evaluate) and the record's status."""

    label: str
    id: str
    path: Path
    action: str  # skip | train | resume | evaluate, or claimed (another process held a live claim on it)
    status: str
    reason: str | None = None


@dataclass
class SweepResult:
    """The summary of a sweep; `table()` gives its tidy results."""

    plan: SweepPlan
    runs: list[RunOutcome] = field(default_factory=list)
    dry_run: bool = False

    @property
    def counts(self) -> dict[str, int]:
        return self.plan.counts

    @property
    def results_dir(self) -> Path:
        return self.plan.results_dir

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def trained(self) -> list[RunOutcome]:
        """Runs this sweep trained, resumed or evaluated."""
        return [r for r in self.runs if r.action in ("train", "resume", "evaluate")]

    @property
    def claimed(self) -> list[RunOutcome]:
        """Runs left to another process that held a live claim on them."""
        return [r for r in self.runs if r.action == "claimed"]

    def records(self) -> list[dict[str, Any]]:
        """The run.json of every run of this sweep that has one."""
        from mugcp_bench.report.tidy import read_run

        out = []
        for r in self.runs:
            if r.path.is_file():
                rec = read_run(r.path)
                if rec is not None:
                    out.append(rec)
        return out

    def table(self, complete_only: bool = True):
        """Tidy pandas DataFrame (one row per run x evaluation, `report.tidy` columns) of this sweep's runs."""
        from mugcp_bench.report.tidy import read_run, records_to_frames

        pairs = [(r.path, rec) for r in self.runs if r.path.is_file() and (rec := read_run(r.path)) is not None]
        _, tidy = records_to_frames(pairs)
        if complete_only:
            tidy = tidy[tidy["status"] == "complete"].reset_index(drop=True)
        return tidy


class Reporter:
    """Progress callbacks of a sweep; the default logs. The CLI's draws a rich progress bar on stderr."""

    def planned(self, plan: SweepPlan) -> None:
        c = plan.counts
        log.info(
            "%d runs: %d done, %d to train, %d to resume, %d to evaluate",
            c["runs"],
            c.get("skip", 0),
            c.get("train", 0),
            c.get("resume", 0),
            c.get("evaluate", 0),
        )

    def start(self, total: int) -> None:
        """Execution begins with `total` runs to do."""

    def run_started(self, label: str) -> None:
        log.info("run %s", label)

    def step(self, label: str, info: dict[str, Any]) -> None:
        """A training step of run `label` (epoch, epochs, step, steps, loss, lr, images_per_s)."""

    def run_finished(self, label: str, status: str, reason: str | None) -> None:
        """Run `label` ended with `status` (complete / failed, or running: claimed by another process) and the
        `reason` (the failure's, or who holds the claim)."""
        if status == "failed":
            log.error("run failed: %s: %s", label, reason)

    def close(self) -> None:
        """Execution ended (normally or not)."""


def _claimed(run_dir: Path, timeout: float) -> bool:
    """Whether someone holds a live claim on the run (`mugcp_bench.store.claims`)."""
    from mugcp_bench.store.claims import read_holder

    holder = read_holder(run_dir)
    return holder is not None and holder.is_live(timeout)


# --- the sweep -----------------------------------------------------------------------------------------------------
def run_sweep(options: SweepOptions | None = None, /, *, reporter: Reporter | None = None, **kw: Any) -> SweepResult:
    """Validate everything, plan, then execute. Every check happens before the first run starts.

    Pass a `SweepOptions` or its fields as keywords. Raises `UserError` on bad input. Under the local executor
    without `keep_going` the first failed run stops the sweep (`RunFailed`, or `UserError` for bad data found while
    running); under `gpus` and `ray` a failed run never stops the others (see `SweepResult.failed`).
    """
    import torch

    from mugcp_bench.datasets.checks import require_datasets
    from mugcp_bench.engine.trainer import resolve_precision
    from mugcp_bench.paths import default_cache_dir
    from mugcp_bench.protocols import get_protocol
    from mugcp_bench.runs.executors import build_executor
    from mugcp_bench.runs.executors.work import RunTask, WorkContext, next_action
    from mugcp_bench.runs.runner import PlannedRun, RunOptions, get_backbone, plan, resolve_methods, summarize

    o = options if options is not None else SweepOptions(**kw)
    if options is not None and kw:
        raise TypeError("pass either a SweepOptions or keywords, not both")
    reporter = reporter or Reporter()
    method_names = resolve_methods(_names(o.methods))
    protocols = [get_protocol(p) for p in _names(o.protocols)]
    if isinstance(o.shots, str) and not o.shots.strip():
        raise UserError("--shots '': give shots per class, e.g. --shots 16 or 1,2,4 (or leave the option out)")
    shots = parse_ints(o.shots, "shots")
    if shots is not None and any(k <= 0 for k in shots):
        raise UserError(f"--shots {o.shots}: shots must be positive")
    seeds = parse_ints(o.seeds, "seeds")
    if not seeds:
        raise UserError(f"--seeds {o.seeds!r}: give at least one seed, e.g. --seeds 1 or 1,2,3")
    if any(s < 0 for s in seeds):
        raise UserError(f"--seeds {o.seeds}: seeds must be >= 0")
    overrides = parse_sets(o.sets)
    grid = parse_grid(o.grid)
    clash = sorted(set(grid) & set(overrides))
    if clash:
        raise UserError(f"--grid {clash[0]} is also given with --set; give it in one of them")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    if not o.claim_timeout > 0:
        raise UserError(f"--claim-timeout {o.claim_timeout}: must be a positive number of seconds")
    executor = build_executor(o.executor, o.gpus, o.ray_address, o.ray_gpus_per_run, o.ray_cpus_per_run)
    device = executor.device(o.device)
    precision = resolve_precision(o.precision, torch.device(device))  # reference-fp16 off CUDA: UserError now
    results_dir = Path(o.results_dir)
    check_writable(results_dir)
    if o.tensorboard:
        from mugcp_bench.runs.tensorboard_events import require_tensorboard

        require_tensorboard()
    cache_dir = default_cache_dir()
    world = resolve_world(o.datasets, o.data_root, o.backbone, o.pretrained, o.quick_toy, cache_dir)
    suite, datasets, data_root = world.suite, world.datasets, world.data_root
    backbone_name, pretrained = world.backbone, world.pretrained
    recipe = o.recipe or world.default_recipe
    if o.no_describe:
        from mugcp_bench.registry import METHODS

        for m in method_names:
            if "describe_missing" in METHODS.get(m).Config.__dataclass_fields__:
                overrides.setdefault("describe_missing", "false")
    opts = RunOptions(
        results_dir=results_dir,
        data_root=Path(data_root),
        cache_dir=cache_dir,
        backbone=backbone_name,
        pretrained=pretrained,
        recipe=recipe,
        device=device,
        precision=o.precision,
        overrides=overrides,
        force=o.force,
        resume=o.resume,
        workers=o.workers if o.workers is not None else (8 if device.startswith("cuda") else 0),
        tensorboard=o.tensorboard,
    )
    backbone = get_backbone(backbone_name, pretrained, device, precision)
    planned: dict[str, PlannedRun] = {}
    for combo in combos:  # every combination planned (and so validated) before the first run starts
        combo_opts = dataclasses.replace(opts, overrides={**overrides, **combo})
        for r in plan(combo_opts, backbone, method_names, protocols, suite, datasets, shots, seeds, o.variants):
            planned.setdefault(r.key.id, r)
    runs = list(planned.values())
    for r in runs:  # left `running` by an owner whose claim is gone or stale (another host, crashed): pick it up
        if r.action == "skip" and r.record.status == "running" and not _claimed(r.record.dir, o.claim_timeout):
            r.action = next_action(r, opts)
    needed = sorted({r.train.dataset for r in runs} | {e.dataset for r in runs for e in r.evals})
    if any(r.action != "skip" for r in runs):
        require_datasets(opts.data_root, needed)  # every dataset, before the first run starts
    labels = [r.label for r in runs]
    sweep_plan = SweepPlan(summarize(runs), backbone_name, recipe, device, results_dir, labels, executor.describe())
    reporter.planned(sweep_plan)
    result = SweepResult(sweep_plan, dry_run=o.dry_run)
    if o.dry_run:
        result.runs = [RunOutcome(r.label, r.key.id, r.record.path, r.action, r.record.status) for r in runs]
        return result
    tasks = [RunTask(r) for r in runs if r.action != "skip"]
    ctx = WorkContext.capture(opts, backbone_name, pretrained, precision, o.claim_timeout)
    stop_file = StopFile(results_dir / ".stop" / new_token())  # how runs in other processes learn of a Ctrl-C
    ctx.stop_file = stop_file.path
    reporter.start(len(tasks))
    try:
        with deferred_sigint():  # first Ctrl-C: stop at the next safe point (docs/protocol.md §4)
            done = {t.id: t for t in executor.run(tasks, ctx, reporter, o.keep_going)}
    finally:
        reporter.close()
        stop_file.clear()
    result.runs = [
        RunOutcome(r.label, r.key.id, r.record.path, t.action, t.status, t.reason)
        if (t := done.get(r.key.id))
        else RunOutcome(r.label, r.key.id, r.record.path, r.action, r.record.status)
        for r in runs
    ]
    return result


__all__ = [
    "DEFAULT_METHODS",
    "Reporter",
    "RunOutcome",
    "SweepOptions",
    "SweepPlan",
    "SweepResult",
    "run_sweep",
]
