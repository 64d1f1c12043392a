"""`mugcp-bench check-data`: is every requested dataset laid out as the loaders expect?"""

from __future__ import annotations

import dataclasses
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from mugcp_bench.errors import UserError
from mugcp_bench.paths import resolve_data_root


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


@click.command("check-data")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Folder holding the datasets (default: $MUGCP_DATA, else ./data).",
)
@click.option(
    "--datasets",
    "datasets",
    default="all",
    show_default=True,
    help="'all' (the 15 benchmark datasets), a group ('toy') or a comma-separated list of names.",
)
@click.option(
    "--decode",
    is_flag=True,
    help="Also open and decode every listed image (reads every file: slow) to find corrupt or truncated ones.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Threads decoding images (--decode)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
def check_data(data_root: str | None, datasets: str, decode: bool, workers: int, as_json: bool) -> None:
    """Check dataset folders, split files and listed images (present, not empty; decoded with --decode).
    Exit 2 if any dataset is unusable."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mugcp_bench.datasets.checks import check_datasets

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        root = resolve_data_root(data_root)
        if decode:
            columns = (SpinnerColumn(), TextColumn("decoding {task.description}: {task.completed:,} images"))
            with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
                tasks: dict[str, int] = {}

                def advance(name: str, n: int) -> None:
                    if name not in tasks:
                        tasks[name] = bar.add_task(name, total=None)
                    bar.advance(tasks[name], n)

                results = check_datasets(root, datasets, decode=True, workers=workers, progress=advance)
        else:
            results = check_datasets(root, datasets)
    except UserError as e:
        err.print(f"error: {e}", markup=False)
        raise click.exceptions.Exit(2) from e

    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) | {"ok": r.ok} for r in results], indent=2))
    else:
        out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
        table = Table(title=f"datasets under {root}", title_justify="left")
        for col, justify in [
            ("dataset", "left"),
            ("folder", "left"),
            ("status", "left"),
            ("classes", "right"),
            ("train", "right"),
            ("val", "right"),
            ("test", "right"),
        ]:
            table.add_column(col, justify=justify)
        for r in results:
            style = "green" if r.ok else "red"
            table.add_row(
                r.name,
                r.folder,
                f"[{style}]{r.status}[/{style}]",
                _count(r.num_classes),
                _count(r.num_train),
                _count(r.num_val),
                _count(r.num_test),
            )
        out.print(table)

    bad = [r for r in results if not r.ok]
    for r in bad:
        err.print(f"\n{r.message}", markup=False)
        err.print("expected layout:", markup=False)
        err.print(r.expected_tree, markup=False)
        err.print("where the data comes from:", markup=False)
        err.print(r.source, markup=False)
    if bad:
        err.print(f"\n{len(bad)} of {len(results)} datasets unusable.", markup=False)
        raise click.exceptions.Exit(2)
