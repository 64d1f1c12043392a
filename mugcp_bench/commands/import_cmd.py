"""`mugcp-bench import PATH...`: checkpoints written by the reference code become runs of ours, evaluated like any run
(`mugcp_bench.interop.importing`; the run path's imported runs: `mugcp_bench.runs.imported`)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--method", default=None, help="The method the files are (default: from the tree, log.txt or the keys).")
@click.option("--dataset", default=None, help="Training dataset (default: from the tree or log.txt).")
@click.option("--protocol", default=None, help="base2novel, cross_dataset or few_shot (default: from the tree).")
@click.option("--shots", default=None, type=click.IntRange(min=1), help="Shots per class (default: from the tree).")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Seed (default: the tree's seed<S>).")
@click.option("--epoch", default=None, type=click.IntRange(min=1), help="Import model.pth.tar-E (default: the last).")
@click.option("--backbone", default=None, help="open_clip architecture (default: log.txt's, else ViT-B-16).")
@click.option("--pretrained", default=None, help="Weights tag or file (default: openai for OpenAI architectures).")
@click.option("--recipe", default="paper", show_default=True, help="Recipe whose settings fill what the file lacks.")
@click.option("--set", "sets", multiple=True, help="A setting the file and its log.txt do not hold: --set depth=9.")
@click.option("--data-root", default=None, help="Dataset root for the evaluations (default: $MUGCP_DATA, ./data).")
@click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Evaluate again runs already imported from the same file.")
@click.option("--dry-run", is_flag=True, help="Check and show what would be imported; record nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was imported as JSON on stdout.")
def import_cmd(
    paths: tuple[Path, ...], method: str | None, dataset: str | None, protocol: str | None, shots: int | None,
    seed: int | None, epoch: int | None, backbone: str | None, pretrained: str | None, recipe: str,
    sets: tuple[str, ...], data_root: str | None, results_dir: Path, device: str, force: bool, dry_run: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Import PATHS: model.pth.tar-N files or the reference scripts' output trees, e.g.
    output/base2new/train_base/<dataset>/shots_16/<Trainer>/<cfg>/seed<S>/<learner>/model.pth.tar-N.

    Method, dataset, protocol, shots and seed are read from the flags, else the run's log.txt, else the folder names;
    settings from log.txt and the tensors' shapes. Every file is checked before anything is recorded (a tensor that
    is unknown, missing or of another shape: one line, exit 2). Each becomes a run marked imported (source path, its
    SHA-256, the reference trainer and epoch), evaluated on its protocol's targets; `report` lists it as its own
    entry."""
    from rich.console import Console

    from mugcp_bench.interop.importing import ImportOptions, plan_imports, record_imports
    from mugcp_bench.runs.options import parse_sets, resolve_device

    console = Console(stderr=True)
    opts = ImportOptions(
        method=method,
        dataset=dataset,
        protocol=protocol,
        shots=shots,
        seed=seed,
        backbone=backbone,
        pretrained=pretrained,
        recipe=recipe,
        sets=parse_sets(sets),
        epoch=epoch,
        device=resolve_device(device),
    )
    plans, found = plan_imports(paths, opts)
    for plan in plans:
        console.print(
            f"{plan.source}: {plan.method} ({plan.format.trainer}, epoch {plan.epoch}) {plan.dataset} {plan.classes} "
            f"{plan.shots}-shot seed {plan.seed}, protocol {plan.train_protocol}",
            highlight=False,
            soft_wrap=True,
        )
    skipped = []
    if found.not_checkpoints:
        skipped.append(f"{found.not_checkpoints} files that are not checkpoints")
    if found.other_epochs:
        skipped.append(f"{found.other_epochs} checkpoints of other epochs (--epoch picks one)")
    if skipped:
        console.print(f"skipped {' and '.join(skipped)}", highlight=False)
    summary = {
        "imported": [
            {"source": str(p.source), "method": p.method, "dataset": p.dataset, "protocol": p.train_protocol,
             "shots": p.shots, "seed": p.seed, "epoch": p.epoch, "sha256": p.file.sha256, "read_from": p.origin,
             "settings": p.settings}
            for p in plans
        ],
        "skipped_not_checkpoints": found.not_checkpoints,
        "skipped_other_epochs": found.other_epochs,
    }  # fmt: skip
    if dry_run:
        if as_json:
            click.echo(json.dumps(summary))
        return
    from mugcp_bench.commands.progress import make_reporter
    from mugcp_bench.commands.run import summarize
    from mugcp_bench.errors import RunFailed

    results = record_imports(
        plans,
        reporter=make_reporter(console),
        results_dir=results_dir,
        data_root=data_root,
        device=opts.device,
        force=force,
    )
    failed = [r for result in results for r in result.failed]
    for result in results:
        summarize(result, console)
    if as_json:
        summary["runs"] = [
            {"id": r.id, "label": r.label, "action": r.action, "status": r.status}
            for result in results
            for r in result.runs
        ]
        summary["failed"] = len(failed)
        click.echo(json.dumps(summary))
    if failed:
        raise RunFailed(f"{len(failed)} imported runs failed to evaluate (see each run.json)")
