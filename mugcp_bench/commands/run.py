"""`mugcp-bench run` and `mugcp-bench ablate`: option parsing and printing; the sweep is `mugcp_bench.runs.sweep`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mugcp_bench.errors import RunFailed
from mugcp_bench.runs.sweep import DEFAULT_METHODS, Reporter, SweepOptions, SweepPlan, run_sweep


def run_options(f):
    """Options shared by `run` and `ablate`."""
    opts = [
        click.option(
            "--protocol",
            "protocols",
            default="base2novel",
            show_default=True,
            help="base2novel, cross_dataset, domain_generalization, few_shot (comma-separated).",
        ),
        click.option("--datasets", default=None, help="all or name,name (default: the suite's datasets)."),
        click.option("--shots", default=None, help="Shots per class (default: 16; few_shot: 1,2,4,8,16)."),
        click.option("--seeds", default="1,2,3", show_default=True, help="Seeds, e.g. 1,2,3 or 1-5."),
        click.option("--data-root", default=None, help="Dataset root (default: $MUGCP_DATA, else ./data)."),
        click.option("--backbone", default=None, help="open_clip architecture, e.g. ViT-B-16 (default: toy world)."),
        click.option("--pretrained", default=None, help="open_clip tag (openai, ...) or checkpoint file."),
        click.option("--recipe", default=None, help="paper or toy (default: paper; toy in the toy world)."),
        click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path)),
        click.option("--set", "sets", multiple=True, help="Override a setting: --set epochs=2 --set n_ctx=8."),
        click.option(
            "--grid",
            "grid",
            multiple=True,
            help="Cross settings: --grid n_ctx=4,16 --grid lr=0.002,0.01 (every combination is its own run; "
            "report --by-config tells them apart).",
        ),
        click.option("--dry-run", is_flag=True, help="Show how many runs there are, done and to train."),
        click.option("--force", is_flag=True, help="Retrain runs that are already complete."),
        click.option("--resume/--no-resume", default=True, show_default=True, help="Resume from epoch checkpoints."),
        click.option("--keep-going", is_flag=True, help="Record a failed run and continue with the others."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto."),
        click.option(
            "--precision",
            default="auto",
            show_default=True,
            help="auto, fp32, bf16, fp16 (CUDA autocast) or reference-fp16 (CUDA: the reference code's fp16 regime).",
        ),
        click.option(
            "--workers",
            default=None,
            type=click.IntRange(min=0),
            help="Data loader workers (default: 0 on CPU, 8 on GPU).",
        ),
        click.option("--no-describe", is_flag=True, help="MuGCP: fail if descriptions are missing from the cache."),
        click.option(
            "--tensorboard", is_flag=True, help="Also write TensorBoard event files per run (needs tensorboard)."
        ),
        click.option(
            "--executor",
            default="local",
            show_default=True,
            help="local (this process), gpus (a worker per device) or ray (a Ray task per run).",
        ),
        click.option("--gpus", default=None, help="gpus: device indices, e.g. 0,1,3 (default: all), or cpu:N."),
        click.option("--ray-address", default=None, help="ray: auto or HOST:PORT (default: start a local Ray)."),
        click.option(
            "--ray-gpus-per-run", default=None, type=float, help="ray: GPUs per run (default 1 on CUDA, 0 on CPU)."
        ),
        click.option("--ray-cpus-per-run", default=1.0, show_default=True, type=float, help="ray: CPUs per run."),
        click.option(
            "--claim-timeout",
            default=120.0,
            show_default=True,
            type=float,
            help="Seconds without a heartbeat after which a run claimed by another process is taken over.",
        ),
        click.option("--quick-toy", is_flag=True, hidden=True, help="Use the quick toy world (tests)."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan/results summary as JSON on stdout."),
    ]
    return functools.reduce(lambda acc, o: o(acc), reversed(opts), f)


class ConsoleReporter(Reporter):
    """The plan line and a progress bar of the runs on stderr: done / running / failed across all workers."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.running: set[str] = set()
        self.rows: dict[str, Any] = {}  # label -> progress row of a running run
        self.failed = 0
        self.claimed = 0

    def _counts(self) -> str:
        parts = [f"{len(self.running)} running"]
        if self.failed:
            parts.append(f"[red]{self.failed} failed[/]")
        if self.claimed:
            parts.append(f"{self.claimed} claimed elsewhere")
        return ", ".join(parts)

    def planned(self, plan: SweepPlan) -> None:
        c = plan.counts
        self.console.print(
            f"[bold]{c['runs']}[/] runs: {c.get('skip', 0)} done, {c.get('train', 0)} to train, "
            f"{c.get('resume', 0)} to resume, {c.get('evaluate', 0)} to evaluate "
            f"({plan.backbone}, recipe {plan.recipe}, {plan.device}, {plan.executor}, results in {plan.results_dir})"
        )

    def start(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("runs", total=total, status="", counts=self._counts())

    def run_started(self, label: str) -> None:
        self.running.add(label)
        self.progress.update(self.task, counts=self._counts())

    def step(self, label: str, s: dict[str, Any]) -> None:
        if label not in self.running:  # a worker's last step report arriving after its run ended
            return
        # one row per training run (one under the local executor, one per worker under gpus), gone when it ends
        row = self.rows.get(label)
        if row is None:
            row = self.rows[label] = self.progress.add_task(label, total=None, status="", counts="")
        self.progress.update(
            row,
            total=s["epochs"] * s["steps"],  # the row's bar and count: training steps of the run
            completed=s["epoch"] * s["steps"] + s["step"] + 1,
            status=f"epoch {s['epoch'] + 1}/{s['epochs']} it {s['step'] + 1}/{s['steps']} "
            f"loss {s['loss']:.3f} lr {s['lr']:.2g} {s['images_per_s']:.0f} img/s",
        )

    def run_finished(self, label: str, status: str, reason: str | None) -> None:
        row = self.rows.pop(label, None)
        if row is not None:
            self.progress.remove_task(row)
        self.running.discard(label)
        self.failed += status == "failed"
        self.claimed += status == "running"
        self.progress.update(self.task, advance=1, counts=self._counts())
        if status == "failed":
            self.progress.console.print(f"[red]failed[/] {escape(label)}: {escape(reason or '')}", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def sweep(methods: str, variants: dict[str, list[str]] | None, as_json: bool = False, **kw: Any) -> None:
    """Run the sweep the options describe and print its summary; exit 1 (RunFailed) when a run failed."""
    console = Console(stderr=True)
    result = run_sweep(SweepOptions(methods=methods, variants=variants, **kw), reporter=ConsoleReporter(console))
    if result.dry_run:
        if as_json:
            click.echo(json.dumps({**result.counts, "runs_planned": result.plan.labels}))
        return
    failures = result.failed
    if as_json:
        click.echo(json.dumps({**result.counts, "failed": len(failures), "claimed": len(result.claimed)}))
    if result.claimed:
        console.print(f"{len(result.claimed)} runs were claimed by another process and left to it")
    if failures:
        table = Table(title="failed runs", header_style="bold red")
        table.add_column("run")
        table.add_column("reason")
        for r in failures:
            table.add_row(r.label, r.reason or "")
        console.print(table)
        raise RunFailed(f"{len(failures)} of {len(result.trained)} runs failed (see the table above and each run.json)")


@click.command("run")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="Methods (comma-separated, wildcards).")
@run_options
def run(methods: str, **kw) -> None:
    """Train and evaluate METHODS under a protocol; complete runs are skipped, interrupted ones resumed.

    With no --data-root, --backbone or --datasets this runs in the toy world (prepared on first use, offline)."""
    sweep(methods, None, **kw)


@click.command("ablate")
@click.option("--method", default="mugcp", show_default=True, help="The method to ablate.")
@click.option("--drop", "drops", multiple=True, required=True, help="Component to switch off (repeatable).")
@run_options
def ablate(method: str, drops: tuple[str, ...], **kw) -> None:
    """Run METHOD and, for each --drop X, its variant no-X (its own keyed run) under the same options."""
    from mugcp_bench.registry import METHODS
    from mugcp_bench.runs.runner import variant_overrides

    name = METHODS.canonical(method)
    cls = METHODS.get(name)
    for d in drops:
        variant_overrides(cls, d)  # validate before anything runs
    sweep(name, {name: list(drops)}, **kw)
