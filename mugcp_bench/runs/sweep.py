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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mugcp_bench.engine.interrupts import StopFile, deferred_sigint
from mugcp_bench.errors import UserError
from mugcp_bench.runs.options import (
    RunSettings,
    SweepOptions,
    check_writable,
    default_methods,
    parse_grid,
    parse_ints,
    parse_names,
    parse_sets,
)
from mugcp_bench.runs.plan import WORK, Action
from mugcp_bench.runs.progress import Reporter, SweepPlan
from mugcp_bench.runs.world import resolve_world
from mugcp_bench.store.claims import new_token
from mugcp_bench.store.records import RunStatus

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """One planned run after the sweep: its action (skip/train/resume/evaluate) and the record's status."""

    label: str
    id: str
    path: Path
    action: str  # skip | train | resume | evaluate, or claimed (another process held a live claim on it)
    status: str
    reason: str | None = None
    accuracies: dict[str, float] = field(default_factory=dict)  # "dataset classes" -> accuracy (%) evaluated now
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved settings {"method": .., "train": ..}
    overrides: dict[str, str] = field(default_factory=dict)  # the user's settings that apply to it


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
        return [r for r in self.runs if r.status == RunStatus.FAILED]

    @property
    def trained(self) -> list[RunOutcome]:
        """Runs this sweep trained, resumed or evaluated."""
        return [r for r in self.runs if r.action in WORK]

    @property
    def claimed(self) -> list[RunOutcome]:
        """Runs left to another process that held a live claim on them."""
        return [r for r in self.runs if r.action == Action.CLAIMED]

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


# --- the sweep -----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A sweep's options checked and resolved: the settings every run shares, the world, the executor, the backbone."""

    options: SweepOptions
    settings: RunSettings
    world: Any  # runs.world.World
    executor: Any  # runs.executors.Executor
    backbone: Any  # model.backbone.Backbone
    methods: list[str]
    protocols: list[Any]
    shots: tuple[int, ...] | None
    seeds: tuple[int, ...]
    combos: list[dict[str, str]]


def prepare_sweep(o: SweepOptions) -> Prepared:
    """Check every option and resolve the settings once (UserError on bad input, before anything runs)."""
    import torch

    from mugcp_bench.engine.trainer import check_backbone, resolve_precision
    from mugcp_bench.paths import default_cache_dir
    from mugcp_bench.protocols import get_protocol
    from mugcp_bench.runs.executors import build_executor
    from mugcp_bench.runs.job import get_backbone
    from mugcp_bench.runs.plan import check_overrides, resolve_methods

    method_names = resolve_methods(parse_names(o.methods if o.methods is not None else default_methods()))
    if not method_names:
        raise UserError("--methods '': name at least one method, e.g. --methods coop (see 'mugcp-bench list methods')")
    protocols = [get_protocol(p) for p in parse_names(o.protocols)]
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
    check_overrides(method_names, {**overrides, **{k: v[0] for k, v in grid.items()}})
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    if not o.claim_timeout > 0:
        raise UserError(f"--claim-timeout {o.claim_timeout}: must be a positive number of seconds")
    executor = build_executor(o)
    device = executor.device(o.device)
    precision = resolve_precision(o.precision, torch.device(device))  # reference-fp16 off CUDA: UserError now
    results_dir = Path(o.results_dir)
    check_writable(results_dir)
    if o.tensorboard:
        from mugcp_bench.runs.tensorboard_events import require_tensorboard

        require_tensorboard()
    cache_dir = default_cache_dir()
    world = resolve_world(o.datasets, o.data_root, o.backbone, o.pretrained, o.quick_toy, cache_dir)
    if o.no_describe:
        from mugcp_bench.registry import METHODS

        for m in method_names:
            if "describe_missing" in METHODS.get(m).Config.__dataclass_fields__:
                overrides.setdefault(f"{m}.describe_missing", "false")
    settings = RunSettings(
        results_dir=results_dir,
        data_root=Path(world.data_root),
        cache_dir=cache_dir,
        backbone=world.backbone,
        pretrained=world.pretrained,
        recipe=o.recipe or world.default_recipe,
        device=device,
        precision=precision,
        overrides=overrides,
        force=o.force,
        resume=o.resume,
        workers=o.workers if o.workers is not None else (8 if device.startswith("cuda") else 0),
        tensorboard=o.tensorboard,
        claim_timeout=o.claim_timeout,
        env=RunSettings.captured_env(),
        stop_file=str(results_dir / ".stop" / new_token()),  # how runs in other processes learn of a Ctrl-C
    )
    backbone = get_backbone(settings.backbone, settings.pretrained, device, precision)
    check_backbone(backbone, precision)
    return Prepared(o, settings, world, executor, backbone, method_names, protocols, shots, seeds, combos)


def run_sweep(options: SweepOptions | None = None, /, *, reporter: Reporter | None = None, **kw: Any) -> SweepResult:
    """Validate everything, resolve the settings once, plan, then hand the work to the executor. Every check happens
    before the first run starts.

    Pass a `SweepOptions` or its fields as keywords. Raises `UserError` on bad input. Under the local executor
    without `keep_going` the first failed run stops the sweep (`RunFailed`, or `UserError` for bad data found while
    running); under `gpus` and `ray` a failed run never stops the others (see `SweepResult.failed`).
    """
    from mugcp_bench.runs.plan import PlannedRun, plan

    o = options if options is not None else SweepOptions(**kw)
    if options is not None and kw:
        raise TypeError("pass either a SweepOptions or keywords, not both")
    p = prepare_sweep(o)
    planned: dict[str, PlannedRun] = {}
    for combo in p.combos:  # every combination planned (and so validated) before the first run starts
        settings = dataclasses.replace(p.settings, overrides={**p.settings.overrides, **combo})
        args = (p.methods, p.protocols, p.world.suite, p.world.datasets, p.shots, p.seeds, o.variants)
        for r in plan(settings, p.backbone, *args):
            planned.setdefault(r.key.id, r)
    return execute_plan(p, list(planned.values()), reporter or Reporter())


def execute_plan(p: Prepared, runs: list, reporter: Reporter) -> SweepResult:
    """Check the data every planned run needs, report the plan, then hand the work to the executor."""
    from mugcp_bench.datasets.checks import require_datasets
    from mugcp_bench.runs.job import RunTask
    from mugcp_bench.runs.plan import summarize

    settings, o = p.settings, p.options
    needed = sorted({r.train.dataset for r in runs} | {e.dataset for r in runs for e in r.evals})
    if any(r.action in WORK for r in runs):
        require_datasets(settings.data_root, needed)  # every dataset, before the first run starts
    labels = [r.label for r in runs]
    sweep_plan = SweepPlan(
        summarize(runs), settings.backbone, settings.recipe, settings.device, settings.results_dir, labels,
        p.executor.describe(),
    )  # fmt: skip
    reporter.planned(sweep_plan)
    result = SweepResult(sweep_plan, dry_run=o.dry_run)
    if o.dry_run:
        result.runs = [
            RunOutcome(r.label, r.key.id, r.record.path, r.action.value, r.record.status.value, config=r.config(),
                       overrides=dict(r.overrides))
            for r in runs
        ]  # fmt: skip
        return result
    tasks = [RunTask(r) for r in runs if r.action in WORK]
    stop_file = StopFile(settings.stop_file)
    reporter.start(len(tasks))
    try:
        with deferred_sigint():  # first Ctrl-C: stop at the next safe point (docs/protocol.md §4)
            done = {t.id: t for t in p.executor.run(tasks, settings, reporter, o.keep_going)}
    finally:
        reporter.close()
        stop_file.clear()
    result.runs = [
        RunOutcome(r.label, r.key.id, r.record.path, t.action, t.status, t.reason, t.accuracies, t.seconds)
        if (t := done.get(r.key.id))
        else RunOutcome(r.label, r.key.id, r.record.path, r.action.value, r.record.status.value)
        for r in runs
    ]
    return result


__all__ = [
    "Prepared",
    "Reporter",
    "RunOutcome",
    "SweepOptions",
    "SweepPlan",
    "SweepResult",
    "execute_plan",
    "prepare_sweep",
    "run_sweep",
]
