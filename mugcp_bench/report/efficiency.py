"""The efficiency table (`report --efficiency`): what each method costs, as papers print it next to accuracy.

One table per training protocol, one row per method entry (and device and precision when they vary): trainable
parameters, training time per run and training images/s, evaluation images/s, peak memory, device, precision, and
the number of runs averaged. Read from the run records (`timings`, `resources`, `trainable_params`); runs recorded
before these were stored show "–".
"""

from __future__ import annotations

import math

import pandas as pd

from mugcp_bench.protocols import PROTOCOLS, TRAIN_PROTOCOLS, train_title
from mugcp_bench.report.aggregate import assign_entries, entry_table
from mugcp_bench.report.structure import Options, RowTable
from mugcp_bench.report.tidy import Results
from mugcp_bench.store.records import MEMORY_MEASURES as MEASURES

HEADER = [
    "Method",
    "Trainable params",
    "Train time / run (s)",
    "Train img/s",
    "Eval img/s",
    "Peak memory (MB)",
    "Device",
    "Precision",
    "Runs",
]


def _num(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _params(values: pd.Series) -> str:
    values = values.dropna().astype(int)
    if values.empty:
        return "–"
    lo, hi = int(values.min()), int(values.max())
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


def efficiency_tables(results: Results, options: Options) -> list[RowTable]:
    """One efficiency table per training protocol of the complete runs (filtered by --methods / --seeds)."""
    runs = results.runs[results.runs["status"] == "complete"].copy()
    if options.seeds is not None:
        runs = runs[runs["seed"].isin(list(options.seeds))]
    if options.methods:
        keep = set(options.methods)
        runs = runs[runs["method_label"].isin(keep) | runs["method"].isin(keep)]
    present = set(runs["train_protocol"].dropna())
    ordered = [p for p in TRAIN_PROTOCOLS if p in present] + sorted(present - set(TRAIN_PROTOCOLS))
    return [_table(str(p), runs[runs["train_protocol"] == p], options.by_config) for p in ordered]


def _table(protocol: str, runs: pd.DataFrame, by_config: bool = False) -> RowTable:
    with_shots = all(p.table.shots_in_entry for p in PROTOCOLS.values() if p.train_protocol == protocol)
    runs = assign_entries(runs, with_shots=with_shots, by_config=by_config)
    runs = runs.assign(device_label=runs["device_name"].fillna(runs["device"]).fillna("–").astype(str))
    rows, data = [], []
    for entry in entry_table(runs)["entry"]:
        esub = runs[runs["entry"] == entry]
        for (device, precision), g in esub.groupby(["device_label", "precision"], sort=True, dropna=False):
            trained = g[g["train_s"].notna()]
            record = {
                "entry": entry,
                "method": g["method"].iloc[0],
                "variant": g["variant"].iloc[0],
                "train_protocol": protocol,
                "trainable_params_min": g["trainable_params"].min(),
                "trainable_params_max": g["trainable_params"].max(),
                "train_s_mean": trained["train_s"].mean() if len(trained) else math.nan,
                "train_images_per_s": trained["train_images_per_s"].mean() if len(trained) else math.nan,
                "eval_images_per_s": g["eval_images_per_s"].mean(),
                "peak_memory_mb": g["peak_memory_mb"].max(),
                "memory_measure": ",".join(sorted(set(g["memory_measure"].dropna()))),
                "device": device,
                "precision": precision,
                "runs": len(g),
            }
            data.append(record)
            rows.append(
                [
                    entry,
                    _params(g["trainable_params"]),
                    _num(record["train_s_mean"]) if len(trained) else "– (no training)",
                    _num(record["train_images_per_s"]),
                    _num(record["eval_images_per_s"]),
                    _num(record["peak_memory_mb"]),
                    device,
                    str(precision),
                    str(len(g)),
                ]
            )
    table = RowTable(
        name=f"efficiency_{protocol}",
        title=f"Efficiency ({train_title(protocol)} runs)",
        header=list(HEADER),
        rows=rows,
        align=["l", "r", "r", "r", "r", "r", "l", "l", "r"],
        data=pd.DataFrame(data),
    )
    measures = sorted(set(runs["memory_measure"].dropna()))
    if measures:
        said = "; ".join(MEASURES.get(m, m) for m in measures)
        table.note("measure", f"Peak memory: {said} (largest over the runs).")
    table.note(
        "measure",
        "Train time / run and images/s: mean over the runs (per-run wall clock of the training loop; "
        "evaluation images/s include feature extraction and text encoding).",
    )
    missing = int(runs["eval_images_per_s"].isna().sum())
    if missing:
        table.note("missing", f"{missing} run(s) recorded without timings or memory (older records): shown as –.")
    return table
