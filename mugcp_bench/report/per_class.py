"""Per-class accuracy from the stored per-image predictions (`report --per-class DATASET`), and the hardest classes.

One table per evaluation of the dataset (protocol x class subset): a row per class (label order), a column per
method entry (few-shot: per method and K), mean ± std over seeds; the last row is the class-balanced mean. The
hardest classes are those with the lowest accuracy averaged over the table's columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mugcp_bench.errors import UserError
from mugcp_bench.protocols import PROTOCOLS, short_title
from mugcp_bench.registry import suggest
from mugcp_bench.report.aggregate import assign_entries, entry_table, group_labels, prepare
from mugcp_bench.report.published import AVERAGE
from mugcp_bench.report.statistics import seed_cells
from mugcp_bench.report.structure import Column, Options, Table
from mugcp_bench.report.tidy import Results, dataset_display, dataset_key
from mugcp_bench.store import predictions

log = logging.getLogger(__name__)

N_HARDEST = 5
_SUBSET_TITLE = {"base": "base classes", "novel": "novel classes", "all": "all classes"}


def _per_class_values(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str], int]:
    """Per-seed per-class accuracies (entry, row=class index, group, seed, value, n), the class names, and the
    number of runs left out for lack of predictions."""
    records, classnames, missing = [], None, 0
    for r in frame.itertuples(index=False):
        if not isinstance(r.predictions, str):
            missing += 1
            continue
        try:
            p = predictions.read(r.predictions, r.predictions_sha256 if isinstance(r.predictions_sha256, str) else None)
        except predictions.PredictionsError as e:
            log.warning("%s; left out of the per-class table", e)
            missing += 1
            continue
        classnames = classnames or p.classnames
        correct = p.correct
        for c in range(len(p.classnames)):
            mask = p.label == c
            if mask.any():
                records.append(
                    {
                        "entry": r.entry,
                        "row": str(c),
                        "group": r.group,
                        "seed": r.seed,
                        "value": 100.0 * float(correct[mask].mean()),
                        "n": int(mask.sum()),
                    }
                )
    return pd.DataFrame(records), classnames or [], missing


def per_class_tables(results: Results, datasets: Sequence[str], options: Options) -> list[Table]:
    """Per-class tables for each named dataset ("all": every dataset with stored predictions)."""
    frame = prepare(results.tidy, options)
    with_preds = frame[frame["predictions"].notna()]
    if list(datasets) == ["all"]:
        keys = list(dict.fromkeys(with_preds["row"]))
    else:
        present = set(frame["row"])
        keys = []
        for name in datasets:
            key = dataset_key(name)
            if key not in present:
                raise UserError(
                    f"--per-class: no complete runs evaluated on '{name}'.{suggest(key, present)} "
                    f"(datasets: {', '.join(sorted(present))})"
                )
            keys.append(key)
    tables = []
    for key in keys:
        sub = frame[frame["row"] == key]
        made = []
        for (protocol, classes), part in sub.groupby(["eval_protocol", "classes"], sort=False):
            table = _table(part, key, str(protocol), str(classes), options.by_config)
            if table is not None:
                made.append(table)
        if not made:
            raise UserError(
                f"--per-class {key}: its runs have no per-image predictions (recorded before predictions were "
                "stored); rerun them with 'mugcp-bench run --force' to get per-class accuracy"
            )
        tables += made
    return tables


def _table(part: pd.DataFrame, key: str, protocol: str, classes: str, by_config: bool = False) -> Table | None:
    kind = protocol if protocol in PROTOCOLS else "cross_dataset"  # the source evaluation of a cross-dataset run
    shape = PROTOCOLS[kind].table
    part = assign_entries(part, with_shots=shape.shots_in_entry, by_config=by_config)
    part = part.assign(group=part["shots"].astype(int).astype(str) if not shape.shots_in_entry else "acc")
    values, classnames, missing = _per_class_values(part)
    if values.empty:
        return None
    cells = seed_cells(values, ["entry", "row", "group"])
    cells["is_average"] = False
    averages = (
        cells.groupby(["entry", "group"], sort=False)
        .agg(mean=("mean", "mean"), n=("n", "min"), n_expected=("n_expected", "max"), complete=("complete", "all"))
        .reset_index()
        .assign(row=AVERAGE, is_average=True, std=np.nan, ci95=np.nan)
    )
    cells = pd.concat([cells, averages], ignore_index=True)
    entries = entry_table(part[part["entry"].isin(set(values["entry"]))])
    groups = sorted(values["group"].unique(), key=lambda g: int(g) if not shape.shots_in_entry else 0)
    rows = [str(c) for c in range(len(classnames)) if str(c) in set(values["row"])]
    row_labels = {str(c): name for c, name in enumerate(classnames)}
    row_labels[AVERAGE] = f"Mean over {len(rows)} classes"
    name = dataset_display(str(part["eval_dataset"].iloc[0]))
    which = f"{_SUBSET_TITLE.get(classes, classes)} ({short_title(protocol)})"
    table = Table(
        kind=kind,
        ablation=False,
        title=f"Per-class accuracy: {name}, {which}",
        cells=cells,
        rows=[*rows, AVERAGE],
        row_labels=row_labels,
        columns=[Column(e, g) for e in entries["entry"] for g in groups],
        entries=entries,
        group_labels=group_labels(shape, groups),
        seed_values=values,
        table_name=f"per_class_{key}_{protocol}_{classes}",
        row_header="Class",
    )
    table.note("values", "Values: per-class accuracy, mean ± sample std over seeds (ddof=1); last row: class-balanced.")
    hardest = cells[~cells["is_average"]].groupby("row")["mean"].mean().sort_values(kind="stable")
    listed = ", ".join(f"{row_labels[r]} ({v:.1f})" for r, v in hardest.head(N_HARDEST).items())
    table.note("hardest", f"Hardest classes (lowest accuracy averaged over the columns): {listed}.")
    if missing:
        table.note("missing", f"{missing} run(s) without stored per-image predictions are left out.")
    return table
