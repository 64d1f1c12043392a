"""The ablation summary: per component, Δ = variant − full method on the dataset average, mean ± std over seeds.

The ablation tables show Δ of the seed means per dataset; this summary answers "what does component X bring" in one
line per variant: for every seed that both the full method and the variant ran, the average over the datasets
(base, novel and HM for base-to-novel, HM of the two averages as in docs/protocol.md §3.2), the paired difference,
then its mean and standard deviation over those seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mugcp_bench.report.statistics import AVERAGE
from mugcp_bench.report.structure import RowTable, Table


def _hm(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def seed_averages(table: Table, entry: str, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per seed of `entry`: its average over the datasets counted in the Average row, per metric."""
    counted = table.cells[table.cells["in_average"].fillna(False).astype(bool)]
    rows = set(counted.loc[counted["entry"] == entry, "row"]) - {AVERAGE}
    values = table.seed_values[(table.seed_values["entry"] == entry) & table.seed_values["row"].isin(rows)]
    wide = values.pivot_table(index=["seed", "row"], columns="group", values="value", aggfunc="mean")
    complete = wide.dropna()  # a seed counts for a dataset only with every metric of it present
    per_seed = complete.groupby(level="seed").mean()
    n_rows = complete.groupby(level="seed").size()
    per_seed = per_seed[n_rows == len(rows)]  # seeds that lack a dataset are left out, not averaged over fewer
    if "hm" in metrics:
        per_seed["hm"] = [_hm(b, n) for b, n in zip(per_seed["base"], per_seed["novel"])]
    return per_seed[[m for m in metrics]]


def _fmt(values: np.ndarray, signed: bool) -> str:
    if values.size == 0:
        return "–"
    mean = f"{values.mean():+.1f}" if signed else f"{values.mean():.1f}"
    return f"{mean} ± {values.std(ddof=1):.1f}" if values.size > 1 else mean


def ablation_summary(table: Table) -> RowTable | None:
    """The summary of one ablation table (None when it holds no full method with variants)."""
    if table.shape.harmonic_mean:
        metrics = table.shape.groups()
    else:
        metrics = [g for g in table.group_labels if not g.startswith("Δ")]
    info = table.entries
    rows: list[list[str]] = []
    data: list[dict] = []
    for full in info[info["variant"] == ""].itertuples(index=False):
        family = info[(info["variant"] != "") & (info["method"] == full.method) & (info["setting"] == full.setting)]
        if family.empty:
            continue
        ref = seed_averages(table, full.entry, metrics)
        rows.append(
            [full.entry, "(full method)", *[_fmt(ref[m].to_numpy(), signed=False) for m in metrics], str(len(ref))]
        )
        for v in family.itertuples(index=False):
            var = seed_averages(table, v.entry, metrics)
            seeds = sorted(set(ref.index) & set(var.index))
            delta = var.loc[seeds] - ref.loc[seeds]  # paired by seed
            rows.append(
                [
                    v.entry,
                    v.variant.removeprefix("no-"),
                    *[_fmt(delta[m].to_numpy(), signed=True) for m in metrics],
                    str(len(seeds)),
                ]
            )
            for m in metrics:
                data.append(
                    {
                        "entry": v.entry,
                        "full_entry": full.entry,
                        "metric": m,
                        "delta_mean": float(delta[m].mean()) if seeds else np.nan,
                        "delta_std": float(delta[m].std(ddof=1)) if len(seeds) > 1 else np.nan,
                        "n_seeds": len(seeds),
                    }
                )
    if not rows:
        return None
    labels = [table.group_labels.get(m, m) for m in metrics]
    summary = RowTable(
        name=f"ablation_summary_{table.kind}",
        title=f"{table.title.split(':')[0]} summary: Δ of the dataset average per component off (± std over seeds)",
        header=["Entry", "Component off", *labels, "Seeds"],
        rows=rows,
        align=["l", "l", *["r"] * len(metrics), "r"],
        data=pd.DataFrame(data),
    )
    summary.note(
        "rule",
        "Δ = variant − full method on the average over the datasets, per seed both ran (paired), then mean ± std "
        "(n − 1) over those seeds; the full method's row shows its own averages. Negative: the component helps.",
    )
    return summary


def ablation_summaries(tables: Sequence[Table]) -> list[RowTable]:
    """A summary for every ablation table of a report."""
    return [s for t in tables if t.ablation and (s := ablation_summary(t)) is not None]
