"""`mugcp-bench run` and `mugcp-bench ablate`: option parsing and printing; the sweep is `mugcp_bench.runs.sweep`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mugcp_bench.commands.params import NameList, ids
from mugcp_bench.commands.progress import make_reporter
from mugcp_bench.errors import RunFailed, UserError
from mugcp_bench.registry import COMPOSE, METHODS, PLUGINS
from mugcp_bench.runs.options import SweepOptions, parse_names, with_plugins

if TYPE_CHECKING:
    from mugcp_bench.runs.sweep import SweepResult


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
        click.option(
            "--datasets", default=None, type=NameList(), help="all or name,name (default: the suite's datasets)."
        ),
        click.option(
            "--shots",
            default=None,
            type=ids(positive=True),
            help="Shots per class (default: 16; few_shot: 1,2,4,8,16).",
        ),
        click.option("--seeds", default="1,2,3", show_default=True, type=ids(), help="Seeds, e.g. 1,2,3 or 1-5."),
        click.option("--data-root", default=None, help="Dataset root (default: $MUGCP_DATA, else ./data)."),
        click.option("--backbone", default=None, help="open_clip architecture, e.g. ViT-B-16 (default: toy world)."),
        click.option("--pretrained", default=None, help="open_clip tag (openai, ...) or checkpoint file."),
        click.option("--recipe", default=None, help="paper or toy (default: paper; toy in the toy world)."),
        click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path)),
        click.option(
            "--plugin",
            "plugins",
            default=None,
            type=NameList(PLUGINS),
            help="Wrap the methods in a plug-in: --methods coop,maple --plugin dept runs coop+dept and maple+dept.",
        ),
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
        click.option(
            "--show-config",
            is_flag=True,
            help="With --dry-run: every planned run's resolved settings, those you set highlighted.",
        ),
    ]
    return functools.reduce(lambda acc, o: o(acc), reversed(opts), f)


def sweep(
    methods: str | None,
    variants: dict[str, list[str]] | None,
    as_json: bool = False,
    show_config: bool = False,
    plugins: str | None = None,
    **kw: Any,
) -> None:
    """Run the sweep the options describe and print its summary; exit 1 (RunFailed) when a run failed."""
    if show_config and not kw.get("dry_run"):
        raise UserError("--show-config shows the plan without running it: add --dry-run")
    from mugcp_bench.runs.sweep import run_sweep  # torch and the methods: only once a sweep is really asked for

    if plugins:  # each method wrapped by the plug-ins: coop -> coop+dept
        methods = with_plugins(methods, plugins)

    console = Console(stderr=True)
    result = run_sweep(SweepOptions(methods=methods, variants=variants, **kw), reporter=make_reporter(console))
    if result.dry_run:
        if as_json:
            planned = [
                {"label": r.label, "id": r.id, "action": r.action, "status": r.status, "overrides": r.overrides}
                | ({"config": r.config} if show_config else {})
                for r in result.runs
            ]
            click.echo(json.dumps({**result.counts, "runs_planned": result.plan.labels, "planned": planned}))
        elif show_config:
            show_configs(result, Console())
        return
    failures = result.failed
    if as_json:
        click.echo(json.dumps({**result.counts, "failed": len(failures), "claimed": len(result.claimed)}))
    summarize(result, console)
    if failures:
        table = Table(title="failed runs", header_style="bold red")
        table.add_column("run")
        table.add_column("reason")
        for r in failures:
            table.add_row(r.label, r.reason or "")
        console.print(table)
        raise RunFailed(f"{len(failures)} of {len(result.trained)} runs failed (see the table above and each run.json)")


def show_configs(result: SweepResult, console: Console) -> None:
    """Every planned run with its resolved settings (method, then training), the ones the user set in bold."""
    for r in result.runs:
        console.print(f"[bold]{escape(r.label)}[/]  id {r.id}, {r.action}", highlight=False)
        for part in ("method", "train"):
            items = []
            for key, value in r.config.get(part, {}).items():
                text = escape(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
                given = key in r.overrides
                items.append(f"[bold yellow]{text}[/]" if given else text)
            console.print(f"  {part}: " + ", ".join(items), highlight=False, soft_wrap=not console.is_terminal)


def summarize(result: SweepResult, console: Console) -> None:
    """What the sweep did, the mean accuracy per method of the runs it evaluated, and where the tables are."""
    done = [r for r in result.trained if r.accuracies]
    if result.claimed:
        n = len(result.claimed)
        console.print(f"{n} run{' was' if n == 1 else 's were'} claimed by another process and left to it")
    if done:
        per: dict[str, dict[str, list[float]]] = {}
        for r in done:
            method = r.label.split(" ", 1)[0]
            for target, acc in r.accuracies.items():
                per.setdefault(method, {}).setdefault(target.split(" ")[-1], []).append(acc)
        lines = [
            f"  {m}: " + ", ".join(f"{c} {sum(v) / len(v):.2f} (n={len(v)})" for c, v in groups.items())
            for m, groups in per.items()
        ]
        n = len(done)
        console.print(f"{n} run{'s' if n != 1 else ''} evaluated now; mean accuracy (%) by classes:", highlight=False)
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
    console.print(f"tables: mugcp-bench report --results-dir {result.results_dir}", highlight=False)


@click.command("run")
@click.option(
    "--methods",
    default=None,
    type=NameList(METHODS, extra=("all",)),
    help="Methods (comma-separated, wildcards, all) [default: those of the paper tables, see 'mugcp-bench list "
    "methods'].",
)
@run_options
def run(methods: str, **kw) -> None:
    """Train and evaluate METHODS under a protocol; complete runs are skipped, interrupted ones resumed.

    With no --data-root, --backbone or --datasets this runs in the toy world (prepared on first use, offline)."""
    sweep(methods, None, **kw)


@click.command("ablate")
@click.option("--method", default="mugcp", show_default=True, help="The method to ablate (coop+dept: with a plug-in).")
@click.option("--drop", "drops", multiple=True, required=True, help="Component to switch off (repeatable).")
@run_options
def ablate(method: str, drops: tuple[str, ...], plugins: str | None = None, **kw) -> None:
    """Run METHOD and, for each --drop X, its variant no-X (its own keyed run) under the same options."""
    from mugcp_bench.runs.plan import variant_overrides

    name = METHODS.canonical(COMPOSE.join([method, *parse_names(plugins)]))
    cls = METHODS.get(name)
    for d in drops:
        variant_overrides(cls, d)  # validate before anything runs
    sweep(name, {name: list(drops)}, **kw)
