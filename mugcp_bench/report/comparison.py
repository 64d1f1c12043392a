"""Δ columns of a report table: against the published numbers (with their confidence) or another method."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from mugcp_bench.protocols import PROTOCOLS, real_suite
from mugcp_bench.report.published import AVERAGE, CONFIDENCE_MARKERS, load_published, published_method
from mugcp_bench.report.structure import Table

PAPER_BACKBONE = "vitb16"  # the published tables use CLIP ViT-B/16 with 16 shots
PAPER_SHOTS = 16


def paper_average_rows(kind: str, published: pd.DataFrame | None = None) -> frozenset[str] | None:
    """The datasets behind a published Average: those the published table has per-dataset numbers for (the
    cross-dataset and DG source excluded). A Δ on an Average row needs exactly these rows. Read off the published
    numbers themselves, so a dataset added to the benchmark suite never changes what the papers averaged."""
    published = load_published() if published is None else published
    rows = published[(published["protocol"] == kind) & (published["dataset_key"] != AVERAGE)]
    if rows.empty:
        return None
    source = real_suite().source if PROTOCOLS[kind].table.source_row else None
    return frozenset(set(rows["dataset_key"]) - {source})


# ---------------------------------------------------------------------------------------------------------------
# Δ against the published numbers or another method
# ---------------------------------------------------------------------------------------------------------------
# Every published number comes from the reference code's default precision (fp16 CLIP weights and prompts, plain SGD;
# docs/protocol.md §4.5); our runs match it only in that mode.
REFERENCE_PRECISION = "reference-fp16"


def _paper_metric(kind: str, group: str, is_average: bool) -> str | None:
    """The published numbers' metric for a cell (published.csv `metric`): base / novel / hm, acc, or their averages;
    None where the papers publish no such number (per-K few-shot cells)."""
    shape = PROTOCOLS[kind].table
    if shape.columns == "classes" and group in shape.groups():
        return f"avg_{group}" if is_average else group
    if shape.columns == "single" and group == "acc":
        return "avg" if is_average else "acc"
    return None


def attach_paper(table: Table, published: pd.DataFrame | None = None) -> None:
    """Columns ref_value, ref_marker, delta (ours − published) where a published number exists for the cell."""
    published = load_published() if published is None else published
    index = {
        (r.method, r.protocol, r.dataset_key, r.metric): (r.value, CONFIDENCE_MARKERS[r.confidence])
        for r in published.itertuples(index=False)
    }
    info = table.entries.set_index("entry")
    comparable = {
        e
        for e, r in info.iterrows()
        if re.sub(r"[^0-9a-z]", "", str(r["backbone"]).lower()) == PAPER_BACKBONE
        and (not table.shape.shots_in_entry or set(r["shots"]) == {PAPER_SHOTS})
    }
    counted = table.cells[table.cells["in_average"].fillna(False).astype(bool) & table.cells["mean"].notna()]
    averaged = {k: frozenset(g["row"]) for k, g in counted.groupby(["entry", "group"])}
    paper_rows = paper_average_rows(table.kind, published)
    ref_value, ref_marker = [], []
    for c in table.cells.itertuples(index=False):
        hit = None
        if c.entry in comparable and info.loc[c.entry, "variant"] == "":
            metric = _paper_metric(table.kind, c.group, bool(c.is_average))
            if metric and c.is_average:
                parts = ("base", "novel") if c.group == "hm" else (c.group,)
                if any(averaged.get((c.entry, p)) != paper_rows for p in parts):
                    metric = None  # our average is over other datasets than the published one
            if metric:
                key = (published_method(info.loc[c.entry, "method"]), table.kind, c.row, metric)
                hit = index.get(key)
        ref_value.append(hit[0] if hit else np.nan)
        ref_marker.append(hit[1] if hit else "")
    table.cells = table.cells.assign(ref_value=ref_value, ref_marker=ref_marker)
    table.cells["delta"] = table.cells["mean"] - table.cells["ref_value"]
    table.delta_against = "paper"
    if table.cells["delta"].notna().any():
        table.note(
            "delta",
            "(±x.xx M) = Δ ours − published (percentage points); M = confidence of the published number: "
            "✓ verified, T transcribed, L low (results/reference/README.md).",
        )
    if (
        table.cells["is_average"].astype(bool).any()
        and not table.cells.loc[table.cells["is_average"], "delta"].notna().any()
    ):
        if table.cells["delta"].notna().any():
            table.note(
                "paper-average", "No Δ on the Average row: it is not over the datasets the published average uses."
            )
    skipped = sorted(set(info.index) - comparable)
    if skipped:
        table.note(
            "paper-skipped", f"No Δ vs paper for {', '.join(skipped)}: the published numbers use ViT-B/16, 16 shots."
        )
    compared = sorted(set(table.cells.loc[table.cells["delta"].notna(), "entry"]))
    by_precision: dict[str, list[str]] = {}
    for e in compared:
        if info.loc[e, "precision"] != REFERENCE_PRECISION:
            by_precision.setdefault(str(info.loc[e, "precision"]), []).append(e)
    if by_precision:
        ran = "; ".join(f"{', '.join(es)} ran {p}" for p, es in sorted(by_precision.items()))
        table.note(
            "precision",
            f"Precision differs from the published numbers' (the reference code's fp16 weights and prompts, "
            f"docs/protocol.md §4.5): {ran}. Δ includes that difference.",
        )


def attach_method(table: Table, reference: str) -> bool:
    """Δ of every other entry against `reference` (an entry or method label). False if this table lacks it."""
    entries = list(table.entries["entry"])
    ref = reference if reference in entries else None
    if ref is None:
        by_label = table.entries[table.entries["method_label"] == reference]["entry"].tolist()
        ref = by_label[0] if len(by_label) == 1 else None
    if ref is None:
        table.cells = table.cells.assign(ref_value=np.nan, ref_marker="", delta=np.nan)
        return False
    base = table.cells[table.cells["entry"] == ref].set_index(["row", "group"])["mean"]
    keys = list(zip(table.cells["row"], table.cells["group"]))
    ref_values = [base.get(k, np.nan) for k in keys]
    cells = table.cells.assign(ref_value=ref_values, ref_marker="")
    cells.loc[cells["entry"] == ref, "ref_value"] = np.nan
    cells["delta"] = cells["mean"] - cells["ref_value"]
    table.cells = cells
    table.delta_against = ref
    table.note("delta", f"(±x.xx) = Δ against {ref} (percentage points).")
    return True
