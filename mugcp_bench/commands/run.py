"""`mugcp-bench run` and `mugcp-bench ablate`: plan, check everything, then train and evaluate."""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mugcp_bench.errors import RunFailed, UserError

log = logging.getLogger(__name__)
DEFAULT_METHODS = "zsclip,coop,cocoop,maple,dcp,mugcp"


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
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


def parse_sets(sets: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for s in sets:
        if "=" not in s:
            raise UserError(f"--set '{s}': expected key=value, e.g. --set epochs=2")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
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
        click.option("--dry-run", is_flag=True, help="Show how many runs there are, done and to train."),
        click.option("--force", is_flag=True, help="Retrain runs that are already complete."),
        click.option("--resume/--no-resume", default=True, show_default=True, help="Resume from epoch checkpoints."),
        click.option("--keep-going", is_flag=True, help="Record a failed run and continue with the others."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto."),
        click.option("--precision", default="auto", show_default=True, help="auto, fp32, bf16 or fp16 (CUDA)."),
        click.option("--workers", default=None, type=int, help="Data loader workers (default: 0 on CPU, 8 on GPU)."),
        click.option("--no-describe", is_flag=True, help="MuGCP: fail if descriptions are missing from the cache."),
        click.option("--quick-toy", is_flag=True, hidden=True, help="Use the quick toy world (tests)."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan/results summary as JSON on stdout."),
    ]
    return functools.reduce(lambda acc, o: o(acc), reversed(opts), f)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device '{name}': use cpu, cuda, cuda:N or auto")
    return name


def sweep(methods: str, variants: dict[str, list[str]] | None, **kw) -> None:
    """Validate everything, plan, then execute. Every check happens before the first run starts."""
    from mugcp_bench.datapaths import default_cache_dir, resolve_data_root
    from mugcp_bench.datasets.checks import dataset_names, require_datasets
    from mugcp_bench.protocols import REAL_SUITE, get_protocol, toy_suite
    from mugcp_bench.runner import RunOptions, execute, get_backbone, plan, resolve_methods, summarize

    method_names = resolve_methods([m for m in methods.split(",") if m.strip()])
    protocols = [get_protocol(p) for p in kw["protocols"].split(",") if p.strip()]
    shots = parse_ints(kw["shots"], "shots")
    if shots is not None and any(k <= 0 for k in shots):
        raise UserError(f"--shots {kw['shots']}: shots must be positive")
    seeds = parse_ints(kw["seeds"], "seeds") or (1,)
    overrides = parse_sets(kw["sets"])
    device = _device(kw["device"])
    results_dir = Path(kw["results_dir"])
    check_writable(results_dir)
    cache_dir = default_cache_dir()
    use_toy = kw["data_root"] is None and kw["backbone"] is None and os.environ.get("MUGCP_DATA") is None
    if kw["datasets"] and all(d.strip().lower().startswith("toy_") for d in kw["datasets"].split(",")):
        use_toy = kw["backbone"] is None and kw["data_root"] is None
    if use_toy:
        from mugcp_bench.toy.world import ensure_toy_world

        suite = toy_suite()
        datasets = tuple(dataset_names(kw["datasets"], group="toy")) if kw["datasets"] else None
        if datasets:
            unknown = [d for d in datasets if d not in suite.all_datasets()]
            if unknown:
                raise UserError(f"{', '.join(unknown)} not in the toy world; pass --data-root for real datasets")
        world = ensure_toy_world(cache_dir, quick=kw["quick_toy"])
        data_root, backbone_name, pretrained = world.data_root, world.backbone_name, str(world.checkpoint)
        recipe = kw["recipe"] or "toy"
    else:
        suite = REAL_SUITE
        sel = kw["datasets"]
        datasets = tuple(dataset_names(sel)) if sel and sel != "all" else None
        data_root = resolve_data_root(kw["data_root"])
        backbone_name, pretrained = kw["backbone"] or "ViT-B-16", kw["pretrained"] or "openai"
        recipe = kw["recipe"] or "paper"
    if kw["no_describe"]:
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
        precision=kw["precision"],
        overrides=overrides,
        force=kw["force"],
        resume=kw["resume"],
        workers=kw["workers"] if kw["workers"] is not None else (8 if device.startswith("cuda") else 0),
    )
    backbone = get_backbone(backbone_name, pretrained, device)
    runs = plan(opts, backbone, method_names, protocols, suite, datasets, shots, seeds, variants)
    needed = sorted({r.train.dataset for r in runs} | {e.dataset for r in runs for e in r.evals})
    if any(r.action != "skip" for r in runs):
        require_datasets(opts.data_root, needed)  # every dataset, before the first run starts
    counts = summarize(runs)
    console = Console(stderr=True)
    console.print(
        f"[bold]{counts['runs']}[/] runs: {counts.get('skip', 0)} done, {counts.get('train', 0)} to train, "
        f"{counts.get('resume', 0)} to resume, {counts.get('evaluate', 0)} to evaluate "
        f"({backbone_name}, recipe {recipe}, {device}, results in {results_dir})"
    )
    if kw["dry_run"]:
        if kw["as_json"]:
            click.echo(json.dumps({**counts, "runs_planned": [r.label for r in runs]}))
        return
    todo = [r for r in runs if r.action != "skip"]
    failures: list[tuple[str, str]] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("runs", total=len(todo), status="")

        for run in todo:
            progress.update(task, description=f"{run.label}", status="")

            def on_step(s, run=run):
                progress.update(
                    task,
                    status=f"epoch {s['epoch'] + 1}/{s['epochs']} it {s['step'] + 1}/{s['steps']} "
                    f"loss {s['loss']:.3f} lr {s['lr']:.2g} {s['images_per_s']:.0f} img/s",
                )

            try:
                execute(run, backbone, opts, progress=on_step)
            except (RunFailed, UserError) as e:
                failures.append((run.label, str(e)))
                if not kw["keep_going"]:
                    raise
                log.error("run failed: %s", e)
            progress.advance(task)
    if kw["as_json"]:
        click.echo(json.dumps({**counts, "failed": len(failures)}))
    if failures:
        table = Table(title="failed runs", header_style="bold red")
        table.add_column("run")
        table.add_column("reason")
        for label, reason in failures:
            table.add_row(label, reason)
        console.print(table)
        raise RunFailed(f"{len(failures)} of {len(todo)} runs failed (see the table above and each run.json)")


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
    from mugcp_bench.runner import variant_overrides

    name = METHODS.canonical(method)
    cls = METHODS.get(name)
    for d in drops:
        variant_overrides(cls, d)  # validate before anything runs
    sweep(name, {name: list(drops)}, **kw)
