"""Report plots (matplotlib, Agg canvas, no pyplot state): each function returns a Figure; `make_plots` saves them.

One fixed colour per method, keyed by its name (variants get a lighter shade of their method's colour and a
hatch), so a method looks the same in every plot and every report.
"""

from __future__ import annotations

import colorsys
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullLocator

from mugcp_bench.atomic import atomic_path
from mugcp_bench.errors import UserError
from mugcp_bench.protocols import short_title
from mugcp_bench.report.published import AVERAGE
from mugcp_bench.report.statistics import seedwise_average
from mugcp_bench.report.structure import Report, Table
from mugcp_bench.report.tidy import dataset_display
from mugcp_bench.store import predictions

log = logging.getLogger(__name__)

# Fixed colours for the methods the suite ships and the published baselines (Okabe-Ito / tab10 hues).
# Other methods: a colour picked by a stable hash of the name (never Python's salted hash()).
FALLBACK_COLORS = ["#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
HATCHES = ["//", "\\\\", "xx", "..", "oo", "++"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "8"]


def _stable_index(name: str, n: int) -> int:
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % n


def method_color(method: str, variant: str = "", color: str | None = None) -> str:
    """Hex colour of a method (or of one of its ablation variants: the method's hue, lighter): the `color` it declares
    (recorded in its runs), else one picked by a stable hash of its name."""
    base = color if isinstance(color, str) and color else FALLBACK_COLORS[_stable_index(method, len(FALLBACK_COLORS))]
    if not variant:
        return base
    h, lum, s = colorsys.rgb_to_hls(*mcolors.to_rgb(base))
    lighter = min(0.85, lum + 0.15 + 0.1 * _stable_index(variant, 3))
    return mcolors.to_hex(colorsys.hls_to_rgb(h, lighter, s))


def _hatch(variant: str) -> str:
    return HATCHES[_stable_index(variant, len(HATCHES))] if variant else ""


def _entry_style(table: Table) -> dict[str, tuple[str, str]]:
    """entry -> (colour, hatch)."""
    return {
        r.entry: (method_color(r.method, r.variant, getattr(r, "color", None)), _hatch(r.variant))
        for r in table.entries.itertuples()
    }


def _value(table: Table, entry: str, row: str, group: str) -> float:
    c = table.cell(entry, row, group)
    return math.nan if c is None else float(c["mean"])


def _complete(table: Table, entry: str, row: str, group: str) -> bool:
    c = table.cell(entry, row, group)
    return c is not None and bool(c["complete"])


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _entries(table: Table) -> list[str]:
    return list(dict.fromkeys(c.entry for c in table.columns if not c.delta))


def _dataset_rows(table: Table) -> list[str]:
    return [r for r in table.rows if r != AVERAGE]


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------
def _bars(ax, table: Table, rows: list[str], series: list[tuple[str, str, str]]) -> list[Patch]:
    """Grouped bars: one group per row, one bar per (label, entry, group) series; incomplete cells are hatched.

    Returns one legend proxy per series (the bars themselves may carry the incomplete-cell hatch).
    """
    proxies = []
    style = _entry_style(table)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(rows))
    for i, (label, entry, group) in enumerate(series):
        values = [_value(table, entry, r, group) for r in rows]
        color, hatch = style[entry]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width, color=color, hatch=hatch, edgecolor="white")
        proxies.append(Patch(facecolor=color, hatch=hatch, edgecolor="white", label=label))
        for bar, row in zip(bars, rows):
            if not _complete(table, entry, row, group):
                bar.set_hatch("xx")
                bar.set_edgecolor("black")
    labels = [table.row_labels[r].replace(" (source)", "") for r in rows]
    ax.set_xticks(x, labels)
    if len(rows) > 3 or max(len(label) for label in labels) > 9:
        ax.tick_params(axis="x", labelrotation=25)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    if AVERAGE in rows:
        ax.axvline(rows.index(AVERAGE) - 0.5, color="0.6", linestyle="--", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return proxies


def _bar_legend(ax, table: Table, entries: list[str], handles: list[Patch], title: str = "Method") -> None:
    handles = list(handles)
    if any(not bool(c) for c in table.cells.loc[table.cells["entry"].isin(entries), "complete"]):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx", label="missing seeds / datasets"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title=title)


def plot_hm_bars(table: Table) -> Figure:
    """Base-to-novel HM per dataset (and the Average), grouped bars per method."""
    entries = _entries(table)
    rows = table.rows
    fig = _new_figure(max(8.0, 3.0 + len(rows) * max(0.7, 0.17 * len(entries))), 4.6)
    ax = fig.add_subplot()
    handles = _bars(ax, table, rows, [(e, e, "hm") for e in entries])
    values = [_value(table, e, r, "hm") for e in entries for r in rows]
    low = np.nanmin(values) if not np.all(np.isnan(values)) else 0.0
    ax.set_ylim(max(0.0, math.floor((low - 8) / 5) * 5), 100)
    ax.set_xlabel("Dataset")
    ax.set_ylabel("HM (%)")
    ax.set_title(f"{table.title}\nHarmonic mean (HM) of base and novel accuracy per dataset", fontsize=10)
    _bar_legend(ax, table, entries, handles)
    return fig


def plot_base_novel(table: Table) -> Figure:
    """Base vs novel accuracy per dataset (marker = dataset, colour = method, star = Average) with HM iso-lines."""
    entries = _entries(table)
    style = _entry_style(table)
    datasets = _dataset_rows(table)
    fig = _new_figure(7.6, 5.6)
    ax = fig.add_subplot()
    points = []
    for e in entries:
        color = style[e][0]
        for i, r in enumerate(datasets):
            b, n = _value(table, e, r, "base"), _value(table, e, r, "novel")
            if not (math.isnan(b) or math.isnan(n)):
                ax.scatter(b, n, color=color, marker=MARKERS[i % len(MARKERS)], s=46, alpha=0.9, edgecolor="white")
                points.append((b, n))
        b, n = _value(table, e, AVERAGE, "base"), _value(table, e, AVERAGE, "novel")
        if not (math.isnan(b) or math.isnan(n)):
            ax.scatter(b, n, color=color, marker="*", s=260, edgecolor="black", linewidth=0.8, zorder=5)
            points.append((b, n))
    lo = max(0.0, math.floor((min(min(p) for p in points) - 5) / 10) * 10) if points else 0.0
    ax.set_xlim(lo, 100)
    ax.set_ylim(lo, 100)
    for level in range(10, 100, 10):
        if level <= lo:
            continue
        b = np.linspace(max(lo, level / 2 + 1e-3), 100, 400)
        n = level * b / (2 * b - level)
        keep = (n >= lo) & (n <= 100)
        if keep.sum() < 2:
            continue
        ax.plot(b[keep], n[keep], color="0.75", linewidth=0.8, linestyle="--", zorder=0)
        ax.annotate(
            f"HM {level}",
            (b[keep][-1], n[keep][-1]),
            xytext=(-3, 3),
            textcoords="offset points",
            fontsize=7,
            color="0.45",
            ha="right",
            va="bottom",
        )
    ax.set_aspect("equal")
    ax.set_xlabel("Base accuracy (%)")
    ax.set_ylabel("Novel accuracy (%)")
    ax.set_title(f"{table.title}\nBase vs novel accuracy (dashed: iso-HM lines)", fontsize=10)
    method_handles = [Line2D([], [], color=style[e][0], marker="o", linestyle="", label=e) for e in entries]
    method_handles.append(
        Line2D([], [], color="0.5", marker="*", markersize=12, markeredgecolor="black", linestyle="", label="Average")
    )
    first = ax.legend(
        handles=method_handles, title="Method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
    )
    ax.add_artist(first)
    ds_handles = [
        Line2D([], [], color="0.3", marker=MARKERS[i % len(MARKERS)], linestyle="", label=table.row_labels[r])
        for i, r in enumerate(datasets)
    ]
    ax.legend(handles=ds_handles, title="Dataset", loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)
    return fig


def plot_hm_radar(table: Table) -> Figure | None:
    """HM per dataset on a radar chart (None with fewer than three datasets: no polygon to draw)."""
    datasets = _dataset_rows(table)
    if len(datasets) < 3:
        return None
    entries = _entries(table)
    style = _entry_style(table)
    fig = _new_figure(7.2, 5.6)
    ax = fig.add_subplot(projection="polar")
    angles = np.linspace(0, 2 * np.pi, len(datasets), endpoint=False)
    values_all = []
    for e in entries:
        values = np.array([_value(table, e, r, "hm") for r in datasets])
        values_all.extend(values[~np.isnan(values)])
        closed = np.append(values, values[0])
        ang = np.append(angles, angles[0])
        ax.plot(ang, closed, color=style[e][0], linewidth=1.8, marker="o", markersize=4, label=e)
        if len(entries) <= 3:  # more fills blend into one muddy colour
            ax.fill(ang, np.nan_to_num(closed, nan=0.0), color=style[e][0], alpha=0.08)
    low = max(0.0, math.floor((min(values_all) - 10) / 10) * 10) if values_all else 0.0
    ax.set_ylim(low, 100)
    ax.set_xticks(angles, [table.row_labels[r] for r in datasets])
    ax.tick_params(axis="x", pad=10)
    ax.set_rlabel_position(180 / len(datasets))  # radial tick labels between the first two dataset axes
    ax.tick_params(axis="y", labelsize=7)
    for label in ax.get_yticklabels():  # keep the radial scale readable over the polygons
        label.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 0.6})
    ax.yaxis.set_zorder(5)  # the radial axis (labels and circles) above the polygons
    ax.yaxis.grid(True, color="0.8", linewidth=0.6)
    # a polar axis has no place for a radial label of its own: the x label names both coordinates
    ax.set_xlabel("Dataset (angle) · HM in % (radius)", labelpad=14)
    ax.set_title(f"{table.title}\nHM per dataset", pad=18, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1.05), frameon=False, title="Method")
    return fig


def plot_few_shot(table: Table) -> Figure:
    """Accuracy vs shots (log2 axis), one panel for the average over datasets and one per dataset, ±std band."""
    entries = _entries(table)
    style = _entry_style(table)
    shots = sorted({int(c.group) for c in table.columns})
    datasets = _dataset_rows(table)
    panels = [AVERAGE, *datasets] if len(datasets) > 1 else datasets
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.0 * ncols + 1.6, 3.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    avg = seedwise_average(table.seed_values, datasets)
    for ax, panel in zip(axes, panels):
        for e in entries:
            color = style[e][0]
            if panel == AVERAGE:
                sub = avg[avg["entry"] == e].set_index("group")
                mean = np.array([_value(table, e, AVERAGE, str(k)) for k in shots])
                std = np.array([sub["std"].get(str(k), np.nan) for k in shots])
            else:
                cells = [table.cell(e, panel, str(k)) for k in shots]
                mean = np.array([np.nan if c is None else c["mean"] for c in cells], dtype=float)
                std = np.array([np.nan if c is None else c["std"] for c in cells], dtype=float)
            ax.plot(shots, mean, color=color, marker="o", linewidth=1.8, label=e)
            band = ~np.isnan(std) & ~np.isnan(mean)
            if band.any():
                ax.fill_between(np.array(shots)[band], (mean - std)[band], (mean + std)[band], color=color, alpha=0.18)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(shots))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_xlabel("Shots per class (K)")
        ax.set_ylabel("Accuracy (%)")
        name = f"Average over {len(datasets)} datasets" if panel == AVERAGE else table.row_labels[panel]
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(title="Method", fontsize=8, loc="best")
    fig.suptitle(f"{table.title}\nAccuracy vs shots per class (mean ± std over seeds)", fontsize=10)
    return fig


def plot_ablation(table: Table) -> Figure:
    """Δ of each ablation variant against its full method, per dataset (few-shot: per K on the average)."""
    delta_cols = [c for c in table.columns if c.delta]
    style = _entry_style(table)
    info = table.entries.set_index("entry")
    fig = _new_figure(max(8.0, 3.0 + len(table.rows) * max(0.7, 0.17 * len(delta_cols))), 4.6)
    ax = fig.add_subplot()
    if table.shape.columns == "shots":
        groups = list(dict.fromkeys(c.group for c in delta_cols))
        variants = list(dict.fromkeys(c.entry for c in delta_cols))
        x = np.arange(len(groups))
        width = 0.8 / max(1, len(variants))
        handles = []
        for i, v in enumerate(variants):
            values = [_value(table, v, AVERAGE, g) for g in groups]
            ax.bar(x - 0.4 + width * (i + 0.5), values, width, color=style[v][0], hatch=style[v][1])
            handles.append(Patch(facecolor=style[v][0], hatch=style[v][1], edgecolor="white", label=v))
        ax.set_xticks(x, [table.group_labels[g].removeprefix("Δ ") for g in groups])
        ax.set_xlabel("Shots per class (average over datasets)")
    else:
        handles = _bars(ax, table, table.rows, [(c.entry, c.entry, c.group) for c in delta_cols])
        ax.set_xlabel("Dataset")
    ax.axhline(0, color="black", linewidth=0.8)
    deltas = [v for c in delta_cols for r in table.rows if not math.isnan(v := _value(table, c.entry, r, c.group))]
    low, high = min([0.0, *deltas]), max([0.0, *deltas])
    pad = 0.12 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    families = sorted({info.loc[c.entry, "method"] for c in delta_cols})
    metric = table.shape.metric
    ax.set_ylabel(f"Δ {metric} vs full {', '.join(families)} (pp)")
    ax.set_title(table.title, fontsize=10)
    _bar_legend(ax, table, [c.entry for c in delta_cols], handles, title="Variant")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Training curves (run.json `history`) and confusion matrices (stored per-image predictions)
# ---------------------------------------------------------------------------------------------------------------
LOSS_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1))]


def _curve_label(row, several_shots: bool) -> str:
    return f"{row.method_label} ({int(row.shots)}-shot)" if several_shots else str(row.method_label)


def plot_training_curves(history: pd.DataFrame, title: str) -> Figure:
    """Loss (total and each part), learning rate and images/s per epoch; one colour per method, mean over seeds
    (band: the range over seeds for the total loss)."""
    several_shots = history["shots"].nunique() > 1
    history = history.assign(curve=[_curve_label(r, several_shots) for r in history.itertuples(index=False)])
    parts = sorted(c for c in history.columns if c.startswith("loss_") and history[c].notna().any())
    fig = _new_figure(11.5, 7.4)
    (ax_loss, ax_parts), (ax_lr, ax_rate) = fig.subplots(2, 2, squeeze=False)
    handles = []
    for curve, g in history.groupby("curve", sort=True):
        first = g.iloc[0]
        color = method_color(str(first["method"]), str(first["variant"] or ""), first.get("color"))
        by_epoch = g.groupby("epoch")
        epochs = np.array(sorted(g["epoch"].unique()), dtype=float)
        loss = by_epoch["loss"].agg(["mean", "min", "max"]).reindex(epochs)
        ax_loss.plot(epochs, loss["mean"], color=color, marker="o", markersize=3, linewidth=1.6)
        if g["seed"].nunique() > 1:
            ax_loss.fill_between(epochs, loss["min"], loss["max"], color=color, alpha=0.15)
        for part, style in zip(parts, LOSS_STYLES * 4):
            if g[part].notna().any():
                ax_parts.plot(epochs, by_epoch[part].mean().reindex(epochs), color=color, linestyle=style)
        ax_lr.plot(epochs, by_epoch["lr"].mean().reindex(epochs), color=color, marker="o", markersize=3)
        ax_rate.plot(epochs, by_epoch["images_per_s"].mean().reindex(epochs), color=color, marker="o", markersize=3)
        n_seeds = g["seed"].nunique()
        handles.append(Line2D([], [], color=color, label=f"{curve} ({n_seeds} seed{'s' if n_seeds > 1 else ''})"))
    for ax, ylabel, name in (
        (ax_loss, "Loss", "Total training loss (mean over seeds; band: range)"),
        (ax_parts, "Loss", "Loss parts"),
        (ax_lr, "Learning rate", "Learning rate"),
        (ax_rate, "Images / s", "Training throughput"),
    ):
        ax.set_xlabel("Epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax is not ax_lr:
            ax.ticklabel_format(axis="y", useOffset=False)  # a flat loss: plain values, no "1e-5+1.3863" offset
    part_handles = [
        Line2D([], [], color="0.3", linestyle=style, label=part.removeprefix("loss_"))
        for part, style in zip(parts, LOSS_STYLES * 4)
    ]
    ax_parts.legend(handles=part_handles, title="Part", fontsize=8, loc="best")
    fig.legend(handles=handles, title="Method", loc="outside right upper", frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def curve_figures(report: Report) -> dict[str, Figure]:
    """One training-curve figure per training protocol and dataset of the report's methods."""
    results = report.results
    history = getattr(results, "history", None)
    if history is None or history.empty:
        log.info("no per-epoch training history in the records: skipping the training curves")
        return {}
    labels = {m for t in report.tables for m in t.entries["method_label"]}
    history = history[history["method_label"].isin(labels)]
    if report.options.seeds is not None:
        history = history[history["seed"].isin(list(report.options.seeds))]
    figures = {}
    for (protocol, dataset), g in history.groupby(["train_protocol", "train_dataset"], sort=True):
        title = f"Training curves: {dataset_display(str(dataset))} ({protocol} runs)"
        figures[f"curves_{protocol}_{dataset}"] = plot_training_curves(g, title)
    return figures


def plot_confusion(pred: np.ndarray, label: np.ndarray, classnames: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (% of each true class predicted as each class)."""
    k = len(classnames)
    counts = np.zeros((k, k), dtype=np.float64)
    np.add.at(counts, (label, pred), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    share = 100.0 * counts / np.where(rows > 0, rows, 1.0)
    size = min(4.0 + 0.28 * k, 16.0)
    fig = _new_figure(size + 1.4, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="% of the true class", shrink=0.8)
    if k <= 40:
        ax.set_xticks(np.arange(k), classnames, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_yticks(np.arange(k), classnames, fontsize=7)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    color = "white" if share[i, j] > 60 else "black"
                    ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("Predicted class" + ("" if k <= 40 else f" (label order, {k} classes)"))
    ax.set_ylabel("True class" + ("" if k <= 40 else " (label order)"))
    ax.set_title(title, fontsize=10)
    return fig


def _find_run(results, run: str) -> pd.Series:
    runs = results.runs
    path = Path(run)
    if path.exists():
        target = (path / "run.json" if path.is_dir() else path).resolve()
        hit = runs[[Path(p).resolve() == target for p in runs["path"]]]
    else:
        hit = runs[runs["run_id"].astype(str).str.startswith(run.strip().lower())]
    if len(hit) != 1:
        found = "no run" if hit.empty else f"{len(hit)} runs"
        raise UserError(
            f"--confusion '{run}': {found} with that id in '{results.results_dir}'; pass a run id "
            "(the 8 characters after seedN- in its folder name) or the run folder"
        )
    return hit.iloc[0]


def confusion_figures(results, run: str) -> dict[str, Figure]:
    """One confusion matrix per evaluation of one run (from its stored per-image predictions)."""
    r = _find_run(results, run)
    evals = results.tidy[results.tidy["run_id"] == r["run_id"]]
    figures = {}
    for e in evals.itertuples(index=False):
        if not isinstance(e.predictions, str):
            continue
        try:
            p = predictions.read(e.predictions, e.predictions_sha256 if isinstance(e.predictions_sha256, str) else None)
        except predictions.PredictionsError as err:
            raise UserError(f"--confusion: {err}") from None
        title = (
            f"{r['method_label']} trained on {dataset_display(str(r['train_dataset']))}, seed {r['seed']}\n"
            f"tested on {dataset_display(str(e.eval_dataset))}, {e.classes} classes ({e.eval_protocol}): "
            f"accuracy {e.accuracy:.2f}%"
        )
        figures[f"confusion_{r['run_id']}_{e.eval_protocol}_{e.eval_dataset}_{e.classes}"] = plot_confusion(
            p.pred, p.label, p.classnames, title
        )
    if not figures:
        raise UserError(
            f"--confusion '{run}': the run has no stored per-image predictions (recorded before they were stored); "
            "rerun it with 'mugcp-bench run --force'"
        )
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------
def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Save as PNG (150 dpi) and PDF, each atomically (temp file + os.replace)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        written.append(path)
    return written


def report_figures(report: Report) -> dict[str, Figure]:
    """Every plot the report's data supports, by file stem; plots without data are left out (logged)."""
    figures: dict[str, Figure] = {}
    main = [t for t in report.tables if not t.ablation and not t.table_name]
    hm_tables = [t for t in main if t.shape.harmonic_mean]
    for t in hm_tables:
        prefix = t.shape.plot_prefix
        figures[f"{prefix}_hm_per_dataset"] = plot_hm_bars(t)
        figures[f"{prefix}_base_vs_novel"] = plot_base_novel(t)
        radar = plot_hm_radar(t)
        if radar is None:
            log.info("skipping the HM radar: it needs three or more %s datasets", short_title(t.kind))
        else:
            figures[f"{prefix}_hm_radar"] = radar
    if not hm_tables:
        log.info("no base-to-novel results: skipping the HM bars, base-vs-novel scatter and HM radar")
    shot_tables = [t for t in main if t.shape.columns == "shots"]
    for t in shot_tables:
        figures[f"{t.shape.plot_prefix}_curves"] = plot_few_shot(t)
    if not shot_tables:
        log.info("no few-shot results: skipping the few-shot curves")
    ablations = [t for t in report.tables if t.ablation]
    for t in ablations:
        figures[f"ablation_{t.kind}"] = plot_ablation(t)
    if not ablations:
        log.info("no ablation variants: skipping the ablation Δ bars")
    figures.update(curve_figures(report))
    return figures


def make_plots(report: Report, out_dir: str | Path) -> list[Path]:
    """Write every supported plot as PNG and PDF under `out_dir`; returns the written paths."""
    written: list[Path] = []
    for stem, fig in report_figures(report).items():
        written.extend(save_figure(fig, out_dir, stem))
    log.info(
        "wrote %d plots to %s: %s", len(written) // 2, out_dir, ", ".join(p.name for p in written if p.suffix == ".png")
    )
    return written
