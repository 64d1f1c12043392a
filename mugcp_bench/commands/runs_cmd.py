"""`mugcp-bench runs`: the runs of a results directory, one line each — id, status, what it trained, the settings that
tell it apart from other runs of its method, its accuracies, and why it failed. The ids are what `report --confusion`,
`predict` and `export` take."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mugcp_bench.commands.params import NameList
from mugcp_bench.report.aggregate import SETTING_FIELDS, config_labels
from mugcp_bench.report.tidy import load_results
from mugcp_bench.store.records import RunStatus

STATUSES = [s.value for s in RunStatus if s != RunStatus.NEW]


def _accuracies(tidy: pd.DataFrame) -> dict[str, str]:
    """run id -> "base 71.20, novel 65.10" or "71.4 (source), dtd 41.80, ..." (every evaluation of the run; the
    training dataset's name is left out)."""
    out: dict[str, list[str]] = {}
    for r in tidy.itertuples(index=False):
        if pd.notna(r.accuracy):
            own = r.eval_dataset == r.train_dataset
            where = (r.classes if r.classes != "all" else "") if own else r.eval_dataset
            out.setdefault(r.run_id, []).append(f"{where} {r.accuracy:.2f}".strip())
    return {k: ", ".join(v) for k, v in out.items()}


@click.command("runs")
@click.option(
    "--results-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("results"), show_default=True
)
@click.option("--methods", type=NameList(), default=None, help="Only these methods (a method includes its variants).")
@click.option("--datasets", type=NameList(), default=None, help="Only runs trained on these datasets.")
@click.option(
    "--status", "statuses", type=NameList(), default=None, help=f"Only these statuses: {', '.join(STATUSES)}."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run on stdout.")
def runs_cmd(results_dir: Path, methods: str | None, datasets: str | None, statuses: str | None, as_json: bool) -> None:
    """List the runs of RESULTS_DIR: id, status, method, dataset, shots, seed, the settings that differ from the
    method's other runs, accuracies and the reason of every failure."""
    from mugcp_bench.errors import UserError
    from mugcp_bench.registry import suggest

    results = load_results(results_dir)
    runs = results.runs.copy()
    for value, column in ((methods, None), (datasets, "train_dataset")):
        if not value:
            continue
        wanted = set(value.split(","))
        if column is None:
            runs = runs[runs["method_label"].isin(wanted) | runs["method"].isin(wanted)]
        else:
            runs = runs[runs[column].isin(wanted)]
    if statuses:
        wanted = set(statuses.split(","))
        bad = sorted(wanted - set(STATUSES))
        if bad:
            raise UserError(f"--status {bad[0]}: unknown status.{suggest(bad[0], STATUSES)} Use {', '.join(STATUSES)}")
        runs = runs[runs["status"].isin(wanted)]
    runs = runs.assign(setting=["|".join(map(str, v)) for v in runs[list(SETTING_FIELDS)].itertuples(index=False)])
    runs = runs.assign(settings=config_labels(runs)).sort_values(
        ["train_protocol", "method_label", "train_dataset", "shots", "seed", "run_id"], kind="stable"
    )
    accuracies = _accuracies(results.tidy)
    rows = [
        {
            "id": r.run_id,
            "status": r.status,
            "method": r.method_label,
            "protocol": r.train_protocol,
            "dataset": r.train_dataset,
            "shots": int(r.shots) if pd.notna(r.shots) else None,
            "seed": int(r.seed) if pd.notna(r.seed) else None,
            "origin": r.origin,
            "settings": r.settings,
            "accuracy": accuracies.get(r.run_id, ""),
            "reason": r.reason if isinstance(r.reason, str) else "",
            "path": str(Path(r.path).parent),
        }
        for r in runs.itertuples(index=False)
    ]
    shown = [
        (row["id"], row["status"], row["method"] + (" (imported)" if row["origin"] == "imported" else ""),
         row["dataset"], str(row["shots"]), str(row["seed"]), row["settings"],
         row["accuracy"] if row["status"] == "complete" else (row["reason"] or row["accuracy"]))
        for row in rows
    ]  # fmt: skip
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    console = Console()
    columns = ("id", "status", "method", "dataset", "shots", "seed", "settings", "accuracy / reason")
    if not console.is_terminal:  # a pipe or a file: tab-separated lines, never wrapped
        click.echo("\t".join(columns))
        for row in rows:
            detail = row["accuracy"] if row["status"] == "complete" else (row["reason"] or row["accuracy"])
            method = row["method"] + (" (imported)" if row["origin"] == "imported" else "")
            values = (
                row["id"],
                row["status"],
                method,
                row["dataset"],
                row["shots"],
                row["seed"],
                row["settings"],
                detail,
            )
            click.echo("\t".join(str(v) for v in values))
        return
    table = Table(header_style="bold", box=None, pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "status"))
    for values in shown:
        style = {"failed": "red", "running": "yellow", "interrupted": "yellow"}.get(values[1], "")
        status = f"[{style}]{values[1]}[/]" if style else values[1]
        table.add_row(values[0], status, *(escape(v) for v in values[2:]))
    console.print(table)
    n = len(rows)
    console.print(f"{n} run{'s' if n != 1 else ''} in {results_dir}", style="dim", highlight=False)


__all__ = ["runs_cmd"]
