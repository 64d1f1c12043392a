"""Seed and dataset aggregation (protocol.md §3) from the tidy table into report tables.

Two stages, kept apart so the dataset stage can be checked on published cells:
1. seed stage (`seed_cells`): per cell (method entry x dataset x metric) mean, sample std (ddof=1), n seeds,
   Student-t 95% half-width, and whether every expected seed is present;
2. dataset stage (`derive`): per-dataset HM from the seed-MEAN base and novel, and the Average row: for
   base-to-novel the HM of the mean base and the mean novel over datasets (never the mean of per-dataset HMs);
   otherwise the mean over the rows that count (cross-dataset and DG targets, the source dataset excluded).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from mugcp_bench.errors import UserError
from mugcp_bench.reference_results import AVERAGE, CONFIDENCE_MARKERS, load_published, published_method
from mugcp_bench.registry import suggest
from mugcp_bench.tidy import DATASET_ORDER, Results, dataset_display, dataset_key, dataset_rank

log = logging.getLogger(__name__)

KINDS = ("base2novel", "cross_dataset", "domain_generalization", "few_shot")
REPORT_PROTOCOLS = (*KINDS, "ablation")
TITLES = {
    "base2novel": "Base-to-novel generalization",
    "cross_dataset": "Cross-dataset transfer (source: {source})",
    "domain_generalization": "Domain generalization (source: {source})",
    "few_shot": "Few-shot classification (all classes)",
}
# Evaluation protocols (run.json `evaluations[].protocol`) that feed each table; "source" = ImageNet accuracy of
# the xd run, shown as a row of the cross-dataset and DG tables but never averaged.
TARGET_PROTOCOL = {
    "base2novel": "base2novel",
    "cross_dataset": "cross_dataset",
    "domain_generalization": "domain_generalization",
    "few_shot": "few_shot",
}
GROUP_LABELS = {"base": "Base", "novel": "Novel", "hm": "HM", "acc": "Acc"}
# Columns of the paper tables in their usual order; unknown methods go between them and the proposed ones.
METHOD_ORDER_HEAD = ("zsclip", "coop", "cocoop", "ivlp", "maple", "promptsrc")
METHOD_ORDER_TAIL = ("dcp", "mugcp")
SETTING_FIELDS = ("backbone", "pretrained", "recipe", "precision")
PAPER_BACKBONE = "vitb16"  # the published tables use CLIP ViT-B/16 with 16 shots
PAPER_SHOTS = 16
# The datasets behind each published Average: a Δ on an Average row needs exactly these rows.
PAPER_AVERAGE_ROWS = {
    "base2novel": frozenset(DATASET_ORDER[:11]),
    "cross_dataset": frozenset(DATASET_ORDER[1:11]),
    "domain_generalization": frozenset(DATASET_ORDER[11:15]),
}
LEAK_TEXT = " of descriptions name the true class"


def hm(base: float, novel: float) -> float:
    """Harmonic mean 2·B·N/(B+N) (NaN if either is NaN, 0 if both are 0)."""
    if base is None or novel is None or math.isnan(base) or math.isnan(novel):
        return math.nan
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def t_halfwidth(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean of n values (NaN for n < 2)."""
    if n < 2 or std is None or math.isnan(std):
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


@dataclass(frozen=True)
class Options:
    """What the report aggregates and how."""

    rounded: bool = False  # per-seed values rounded to 1 decimal (the reference parser) instead of full precision
    ci: bool = False  # show the 95% Student-t half-width instead of the std
    seeds: tuple[int, ...] | None = None  # expected seeds (others are dropped); default: those present per method
    methods: tuple[str, ...] | None = None  # method labels (a bare method name also selects its variants)
    vs: str | None = None  # "paper" or a method entry to compute Δ against

    @property
    def value_column(self) -> str:
        return "accuracy_1dp" if self.rounded else "accuracy"


@dataclass
class Column:
    """One displayed column: an entry (method) and a metric group; `delta` marks an ablation Δ column."""

    entry: str
    group: str
    delta: bool = False


@dataclass
class Table:
    """One report table: long-form cells plus the order and labels to display them."""

    kind: str  # one of KINDS
    ablation: bool
    title: str
    cells: pd.DataFrame  # entry, row, group, mean, std, ci95, n, n_expected, complete, is_average, [ref_*, delta]
    rows: list[str]  # row keys (dataset keys, then AVERAGE)
    row_labels: dict[str, str]
    columns: list[Column]
    entries: pd.DataFrame  # one row per entry: entry, method, variant, method_label, setting + SETTING_FIELDS, shots
    group_labels: dict[str, str]
    seed_values: pd.DataFrame  # per-seed values behind the cells: entry, row, group, seed, value
    footnotes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"ablation_{self.kind}" if self.ablation else self.kind

    def cell(self, entry: str, row: str, group: str) -> pd.Series | None:
        """The cell for (entry, row, group), or None."""
        hit = self.cells[(self.cells["entry"] == entry) & (self.cells["row"] == row) & (self.cells["group"] == group)]
        return None if hit.empty else hit.iloc[0]


@dataclass
class Report:
    """All tables of a report and the report-level footer lines."""

    tables: list[Table]
    footer: list[str]
    options: Options


# ---------------------------------------------------------------------------------------------------------------
# Seed stage
# ---------------------------------------------------------------------------------------------------------------
def seed_cells(values: pd.DataFrame, keys: Sequence[str], expected: dict[str, set[int]] | None = None) -> pd.DataFrame:
    """Mean, sample std (ddof=1), n, 95% half-width and completeness per cell.

    `values` holds one row per seed (columns keys + seed + value, one of the keys is `entry`); `expected` maps an
    entry to the seeds it should have (default: the union of the seeds of that entry's cells).
    """
    keys = list(keys)
    if expected is None:
        expected = {e: set(s.dropna().astype(int)) for e, s in values.groupby("entry", sort=False)["seed"]}
    out = (
        values.groupby(keys, sort=False, dropna=False)
        .agg(
            mean=("value", "mean"),
            std=("value", "std"),
            n=("value", "size"),
            seeds=("seed", lambda s: tuple(sorted(int(x) for x in s))),
        )
        .reset_index()
    )
    out["ci95"] = [t_halfwidth(s, int(n)) for s, n in zip(out["std"], out["n"])]
    out["n_expected"] = [len(expected.get(e, set())) for e in out["entry"]]
    out["complete"] = [expected.get(e, set()) <= set(s) for e, s in zip(out["entry"], out["seeds"])]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Dataset stage
# ---------------------------------------------------------------------------------------------------------------
def derive(kind: str, cells: pd.DataFrame) -> pd.DataFrame:
    """Add per-dataset HM rows (base2novel) and the Average row per entry and group.

    `cells` has columns entry, row, group, mean, complete, in_average (others are carried). base2novel groups
    are "base" and "novel"; the Average HM is hm(mean base, mean novel). A method's Average is marked incomplete
    when any of its cells is incomplete or it lacks a row that another method has.
    """
    cells = cells.copy()
    for col, default in (("n", 1), ("n_expected", 1), ("std", np.nan), ("ci95", np.nan), ("is_average", False)):
        if col not in cells:
            cells[col] = default
    cells["is_average"] = False
    parts = [cells]
    if kind == "base2novel":
        parts.append(_hm_rows(cells))
    counted = cells[cells["in_average"]]
    averages = []
    for group, sub in counted.groupby("group", sort=False):
        all_rows = set(sub["row"])
        for entry, esub in sub.groupby("entry", sort=False):
            esub = esub[esub["mean"].notna()]
            averages.append(
                {
                    "entry": entry,
                    "row": AVERAGE,
                    "group": group,
                    "mean": esub["mean"].mean() if len(esub) else np.nan,
                    "n": int(esub["n"].min()) if len(esub) else 0,
                    "n_expected": int(esub["n_expected"].max()) if len(esub) else 0,
                    "n_rows": len(esub),
                    "complete": bool(esub["complete"].all()) and set(esub["row"]) == all_rows,
                    "in_average": False,
                    "is_average": True,
                }
            )
    avg = pd.DataFrame(averages)
    if kind == "base2novel" and not avg.empty:
        avg = pd.concat([avg, _hm_rows(avg)], ignore_index=True)
    parts.append(avg)
    out = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    out["is_average"] = out["is_average"].astype(bool)
    return out


def _hm_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """HM cells from the base and novel cells of each (entry, row)."""
    base = cells[cells["group"] == "base"].set_index(["entry", "row"])
    novel = cells[cells["group"] == "novel"].set_index(["entry", "row"])
    both = base.merge(novel, left_index=True, right_index=True, suffixes=("_b", "_n"), how="inner")
    if both.empty:
        return pd.DataFrame()
    out = pd.DataFrame(
        {
            "group": "hm",
            "mean": [hm(b, n) for b, n in zip(both["mean_b"], both["mean_n"])],
            "n": np.minimum(both["n_b"], both["n_n"]),
            "n_expected": np.maximum(both["n_expected_b"], both["n_expected_n"]),
            "complete": both["complete_b"] & both["complete_n"],
            "in_average": False,
            "is_average": both["is_average_b"],
        },
        index=both.index,
    ).reset_index()
    if "n_rows_b" in both:
        out["n_rows"] = np.minimum(both["n_rows_b"], both["n_rows_n"]).to_numpy()
    return out


def seedwise_average(seed_values: pd.DataFrame, rows: Iterable[str]) -> pd.DataFrame:
    """Per entry and group: mean and std over seeds of the per-seed average across `rows`.

    A seed counts only where it has every one of the entry's rows (used for the few-shot average band).
    """
    rows = set(rows)
    sub = seed_values[seed_values["row"].isin(rows)]
    records = []
    for (entry, group), esub in sub.groupby(["entry", "group"], sort=False):
        needed = set(esub["row"])
        per_seed = [g["value"].mean() for _, g in esub.groupby("seed") if set(g["row"]) == needed]
        records.append(
            {
                "entry": entry,
                "group": group,
                "mean": float(np.mean(per_seed)) if per_seed else np.nan,
                "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else np.nan,
                "n": len(per_seed),
            }
        )
    return pd.DataFrame(records, columns=["entry", "group", "mean", "std", "n"])


# ---------------------------------------------------------------------------------------------------------------
# Entries (table columns): a method label, plus the setting when one label ran under several settings
# ---------------------------------------------------------------------------------------------------------------
def _method_rank(method: str) -> tuple[int, int, str]:
    if method in METHOD_ORDER_HEAD:
        return (0, METHOD_ORDER_HEAD.index(method), method)
    if method in METHOD_ORDER_TAIL:
        return (2, METHOD_ORDER_TAIL.index(method), method)
    return (1, 0, method)


def assign_entries(frame: pd.DataFrame, with_shots: bool) -> pd.DataFrame:
    """Add `entry` and `setting` columns: the method label, suffixed with the setting fields that vary for it."""
    frame = frame.copy()
    fields = [*SETTING_FIELDS, *(["shots"] if with_shots else [])]
    frame["setting"] = ["|".join(str(v) for v in vals) for vals in frame[fields].itertuples(index=False)]
    entry = pd.Series(frame["method_label"].to_numpy(), index=frame.index, dtype=object)
    for _label, sub in frame.groupby("method_label", sort=False):
        varying = [f for f in fields if sub[f].astype(str).nunique() > 1]
        if varying:
            suffix = (
                sub[varying]
                .astype(str)
                .apply(lambda r, v=varying: ", ".join(f"{x}-shot" if f == "shots" else x for f, x in zip(v, r)), axis=1)
            )
            entry.loc[sub.index] = sub["method_label"] + " (" + suffix + ")"
    frame["entry"] = entry
    return frame


def entry_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per entry, in display order (paper methods, others, DCP, MuGCP; variants after their method)."""
    info = frame.drop_duplicates("entry")[["entry", "method", "variant", "method_label", "setting", *SETTING_FIELDS]]
    shots = frame.groupby("entry")["shots"].agg(lambda s: tuple(sorted(set(int(x) for x in s.dropna()))))
    info = info.assign(shots=info["entry"].map(shots))
    order = sorted(
        info.itertuples(index=False), key=lambda r: (_method_rank(r.method), r.setting, r.variant != "", r.variant)
    )
    return pd.DataFrame(order, columns=info.columns).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Building the tables
# ---------------------------------------------------------------------------------------------------------------
def prepare(tidy: pd.DataFrame, options: Options) -> pd.DataFrame:
    """Complete runs only, the chosen value column as `value`, seeds and methods filtered, `row` = dataset key."""
    frame = tidy[tidy["status"] == "complete"].copy()
    frame = frame[frame["accuracy"].notna() | frame["accuracy_1dp"].notna()]
    if options.seeds is not None:
        frame = frame[frame["seed"].isin(list(options.seeds))]
    if options.methods:
        labels, methods = set(frame["method_label"]), set(frame["method"])
        unknown = [m for m in options.methods if m not in labels and m not in methods]
        if unknown:
            raise UserError(
                f"--methods: no complete results for '{unknown[0]}'.{suggest(unknown[0], labels | methods)}"
            )
        keep = set(options.methods)
        frame = frame[frame["method_label"].isin(keep) | frame["method"].isin(keep)]
    frame["value"] = frame[options.value_column].astype(float)
    frame["row"] = [dataset_key(str(d)) for d in frame["eval_dataset"]]
    return frame.reset_index(drop=True)


def _drop_duplicate_seeds(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, int]:
    """Keep the most recently written run when one cell has several complete runs of the same seed."""
    newest_last = frame.sort_values("mtime", kind="stable")
    dup = newest_last.duplicated([*keys, "seed"], keep="last")
    kept = newest_last[~dup].sort_index()  # back to the file order: output never depends on mtimes otherwise
    return kept, int(dup.sum())


def _row_order(frame: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    first_seen: dict[str, int] = {}
    labels: dict[str, str] = {}
    for name in frame["eval_dataset"]:
        key = dataset_key(str(name))
        if key not in first_seen:
            first_seen[key] = len(first_seen)
            labels[key] = dataset_display(str(name))
    rows = sorted(first_seen, key=lambda k: dataset_rank(k, first_seen[k]))
    return rows, labels


def _kind_frame(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    target = frame[frame["eval_protocol"] == TARGET_PROTOCOL[kind]]
    if kind == "base2novel":
        return target[target["classes"].isin(["base", "novel"])]
    if kind in ("cross_dataset", "domain_generalization") and not target.empty:
        # the ImageNet (source) accuracy of the same runs: a row of its own, not averaged
        source = frame[(frame["eval_protocol"] == "source") & frame["run_id"].isin(set(target["run_id"]))]
        return pd.concat([source, target])
    return target


def build_table(frame: pd.DataFrame, kind: str, options: Options) -> Table | None:
    """The aggregated table of one protocol from prepared rows (None when the protocol has no rows)."""
    sub = _kind_frame(frame, kind)
    if sub.empty:
        return None
    sub = assign_entries(sub, with_shots=kind != "few_shot")
    if kind == "base2novel":
        sub = sub.assign(group=sub["classes"].astype(str))
    elif kind == "few_shot":
        sub = sub.assign(group=sub["shots"].astype(int).astype(str))
    else:
        sub = sub.assign(group="acc")
    sub, n_dup = _drop_duplicate_seeds(sub, ["entry", "row", "group"])
    if options.seeds is not None:
        expected = {e: set(options.seeds) for e in sub["entry"].unique()}
    else:  # the seeds present for the method: its full entry and its ablation variants share them
        family = {k: set(int(x) for x in s.dropna()) for k, s in sub.groupby(["method", "setting"])["seed"]}
        expected = {r.entry: family[(r.method, r.setting)] for r in sub.drop_duplicates("entry").itertuples()}
    cells = seed_cells(sub, ["entry", "row", "group"], expected)
    source_rows = set(sub.loc[sub["eval_protocol"] == "source", "row"])
    cells["in_average"] = ~cells["row"].isin(source_rows)
    cells = derive(kind, cells)

    rows, row_labels = _row_order(sub)
    source_name = " + ".join(sorted(row_labels[k] for k in source_rows)) or "ImageNet"  # the toy world: Toy Objects
    for key in source_rows:
        row_labels[key] = f"{row_labels[key]} (source)"
    n_avg = len([r for r in rows if r not in source_rows])
    row_labels[AVERAGE] = f"Average ({n_avg})"
    rows.append(AVERAGE)

    if kind == "base2novel":
        groups = ["base", "novel", "hm"]
        group_labels = dict(GROUP_LABELS)
    elif kind == "few_shot":
        groups = sorted(sub["group"].unique(), key=int)
        group_labels = {g: f"K={g}" for g in groups}
    else:
        groups = ["acc"]
        group_labels = dict(GROUP_LABELS)
    entries = entry_table(sub)
    expected_seeds = {e: sorted(v) for e, v in expected.items()}
    entries["expected_seeds"] = [",".join(str(x) for x in expected_seeds[e]) for e in entries["entry"]]
    seed_values = sub[["entry", "row", "group", "seed", "value"]].reset_index(drop=True)
    for col in ("n", "n_classes"):
        seed_values[col] = pd.to_numeric(sub[col], errors="coerce").to_numpy() if col in sub else np.nan
    table = Table(
        kind=kind,
        ablation=False,
        title=_title(kind, entries).replace("{source}", source_name),
        cells=cells,
        rows=rows,
        row_labels=row_labels,
        columns=[Column(e, g) for e in entries["entry"] for g in groups],
        entries=entries,
        group_labels=group_labels,
        seed_values=seed_values,
    )
    table.footnotes = _footnotes(table, sub, options, n_dup, n_avg, source_name) + outlier_seed_notes(table)
    return table


# A seed is an outlier when it lies beyond 2σ of its cell's other seeds and further from their mean than both 5 points
# and 3 binomial standard errors of its test set (two close seeds have a tiny σ; small test sets are noisy). A seed is
# near chance when it is within one binomial standard error of chance (or below it): e.g. a diverged run. Both stay
# in the mean; the table names them (user_complaints.md §1).
OUTLIER_SIGMAS = 2.0
OUTLIER_MIN_GAP = 5.0


def _binomial_se(p_percent: float, n: float) -> float:
    """Standard error (points) of an accuracy of p % measured on n images."""
    if not n or pd.isna(n):
        return 0.0
    p = min(max(p_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / float(n))


def outlier_seed_notes(table: Table) -> list[str]:
    """Footnotes naming the outlier seeds and the near-chance seeds of the table's measured cells."""
    spread, chance = [], []
    for (entry, row, group), g in table.seed_values.groupby(["entry", "row", "group"], sort=False):
        if row == AVERAGE or group == "hm":
            continue
        label = f"{entry} {table.row_labels.get(row, row)} {table.group_labels.get(group, group)}"
        g = g.set_index("seed")
        values = g["value"].astype(float)
        near = []
        for seed, v in values.items():
            n, k = g.at[seed, "n"], g.at[seed, "n_classes"]
            if pd.notna(k) and k > 1:
                level = 100.0 / float(k)
                if v <= level + _binomial_se(level, n):
                    near.append((seed, v, level))
            if len(values) < 3:
                continue
            others = values.drop(seed)
            gap = abs(v - others.mean())
            if gap > max(OUTLIER_SIGMAS * others.std(ddof=1), OUTLIER_MIN_GAP, 3 * _binomial_se(others.mean(), n)):
                spread.append(f"{label} seed {seed}: {v:.2f} (other seeds {', '.join(f'{o:.2f}' for o in others)})")
        if near:
            seeds = ", ".join(str(x[0]) for x in near)
            vals = ", ".join(f"{x[1]:.2f}" for x in near)
            chance.append(f"{label} seed{'s' if len(near) > 1 else ''} {seeds}: {vals} (chance {near[0][2]:.2f})")
    notes = []
    if spread:
        notes.append(f"Outlier seeds (beyond 2σ of the other seeds and beyond noise; kept): {'; '.join(spread)}.")
    if chance:
        notes.append(f"Seeds within one standard error of chance (kept): {'; '.join(chance)}.")
    return notes


def seed_notes(table: Table, options: Options) -> list[str]:
    """Legend lines for missing-seed flags, naming the expected seeds of the entries that have incomplete cells."""
    shown = {(c.entry, c.group) for c in table.columns}
    cells = table.cells[[(e, g) in shown for e, g in zip(table.cells["entry"], table.cells["group"])]]
    incomplete = cells[~cells["complete"].astype(bool)]
    if incomplete.empty:
        return []
    entries = list(dict.fromkeys(incomplete["entry"]))
    expected = table.entries.set_index("entry")["expected_seeds"]
    source = "from --seeds" if options.seeds is not None else "the seeds present for the method"
    per = "; ".join(f"{e}: {expected[e]}" for e in entries)
    notes = [f"(k/n) = seeds present / expected; expected = {source} ({per})."]
    if incomplete["is_average"].astype(bool).any():
        notes.append("† = average over cells with missing seeds or datasets (not comparable to a complete average).")
    return notes


def _title(kind: str, entries: pd.DataFrame) -> str:
    parts = []
    backbones = sorted(set(entries["backbone"].dropna().astype(str)))
    if len(backbones) == 1:
        parts.append(backbones[0])
    if kind != "few_shot":
        shots = sorted({s for ss in entries["shots"] for s in ss})
        if len(shots) == 1:
            parts.append(f"{shots[0]} shots")
    return TITLES[kind] + (f" — {', '.join(parts)}" if parts else "")


def _footnotes(table: Table, sub: pd.DataFrame, options: Options, n_dup: int, n_avg: int, source: str) -> list[str]:
    notes = []
    if table.kind == "base2novel":
        notes.append(
            "HM = 2·B·N/(B+N) of the seed-mean Base (B) and Novel (N) accuracy; Average = mean B and mean N over "
            f"the {n_avg} datasets and the HM of those two means (not the mean of per-dataset HMs)."
        )
    elif table.kind == "few_shot":
        notes.append(f"Accuracy per K shots per class; Average = mean over the {n_avg} datasets for each K.")
    else:
        notes.append(f"Average = mean over the {n_avg} target datasets; the {source} source row is not averaged.")
    spread = "95% CI half-width (Student's t, n−1 dof)" if options.ci else "sample std over seeds (ddof=1)"
    value = (
        "per-seed accuracies rounded to 1 decimal (as the reference parser reads them)"
        if options.rounded
        else "full-precision per-seed accuracies"
    )
    notes.append(f"Values: mean ± {spread} of {value}; – = not defined (one seed).")
    if n_dup:
        notes.append(
            f"{n_dup} duplicate run(s) of the same seed (different config): the most recently written is used."
        )
    notes.extend(_leakage_lines(table, sub))
    return notes


def _leakage_lines(table: Table, sub: pd.DataFrame) -> list[str]:
    lines = []
    leaky = sub[sub["leakage"].notna()]
    for entry, esub in leaky.groupby("entry", sort=True):  # stable order, whatever the files' mtimes
        weights = esub["n"].astype(float).fillna(1.0)
        overall = 100 * np.average(esub["leakage"], weights=weights)
        line = f"{entry}: {overall:.1f}%{LEAK_TEXT}"
        if table.kind == "base2novel":
            parts = []
            for cls in ("base", "novel"):
                c = esub[esub["classes"] == cls]
                if len(c):
                    parts.append(
                        f"{cls} {100 * np.average(c['leakage'], weights=c['n'].astype(float).fillna(1.0)):.1f}%"
                    )
            if parts:
                line += f" ({', '.join(parts)})"
        lines.append(line + ".")
    return lines


def ablation_table(table: Table) -> Table | None:
    """Full method vs each of its `<method>-no-X` variants, with Δ = variant − full on the main metric."""
    info = table.entries
    full = info[info["variant"] == ""]
    variants = info[info["variant"] != ""]
    if table.kind == "base2novel":
        groups = ["hm"]
    elif table.kind == "few_shot":
        groups = sorted(table.group_labels, key=int)
    else:
        groups = ["acc"]
    columns: list[Column] = []
    delta_cells = []
    cells = table.cells
    for f in full.itertuples(index=False):
        family = variants[(variants["method"] == f.method) & (variants["setting"] == f.setting)]
        if family.empty:
            continue
        columns.extend(Column(f.entry, g) for g in groups)
        for v in family.itertuples(index=False):
            for g in groups:
                columns.append(Column(v.entry, g))
                columns.append(Column(v.entry, f"Δ{g}", delta=True))
                a = cells[(cells["entry"] == f.entry) & (cells["group"] == g)].set_index("row")
                b = cells[(cells["entry"] == v.entry) & (cells["group"] == g)].set_index("row")
                joint = b.merge(a, left_index=True, right_index=True, suffixes=("", "_full"), how="inner")
                for row, r in joint.iterrows():
                    delta_cells.append(
                        {
                            "entry": v.entry,
                            "row": row,
                            "group": f"Δ{g}",
                            "mean": r["mean"] - r["mean_full"],
                            "n": r["n"],
                            "n_expected": r["n_expected"],
                            "complete": bool(r["complete"]) and bool(r["complete_full"]),
                            "is_average": bool(r["is_average"]),
                            "std": np.nan,
                            "ci95": np.nan,
                        }
                    )
    if not columns:
        return None
    used = {c.entry for c in columns}
    abl_cells = pd.concat([cells[cells["entry"].isin(used)], pd.DataFrame(delta_cells)], ignore_index=True)
    group_labels = dict(table.group_labels)
    group_labels.update({f"Δ{g}": f"Δ {table.group_labels[g]}" for g in groups})
    metric = "HM" if table.kind == "base2novel" else "accuracy"
    abl = Table(
        kind=table.kind,
        ablation=True,
        title=f"Ablation ({TITLES[table.kind].split(' (')[0].lower()}): full method vs variants, Δ {metric}",
        cells=abl_cells,
        rows=list(table.rows),
        row_labels=dict(table.row_labels),
        columns=columns,
        entries=info[info["entry"].isin(used)].reset_index(drop=True),
        group_labels=group_labels,
        seed_values=table.seed_values[table.seed_values["entry"].isin(used)],
    )
    abl.footnotes = [
        f"Δ = variant − full method ({metric}, percentage points); "
        "a variant named method-no-X has component X switched off.",
        *[n for n in table.footnotes if n.startswith("Values:")],
        *[n for n in table.footnotes if _is_leak_line(n) and n.split(":")[0] in used],
    ]
    return abl


def _main_view(table: Table, options: Options) -> Table:
    """The protocol table without ablation variants (unless named in --methods or without their full method)."""
    info = table.entries
    full_keys = set(zip(info.loc[info["variant"] == "", "method"], info.loc[info["variant"] == "", "setting"]))
    named = set(options.methods or ())
    keep = [
        r.entry
        for r in info.itertuples(index=False)
        if r.variant == "" or r.method_label in named or (r.method, r.setting) not in full_keys
    ]
    table.columns = [c for c in table.columns if c.entry in keep]
    table.entries = info[info["entry"].isin(keep)].reset_index(drop=True)
    table.cells = table.cells[table.cells["entry"].isin(keep)].reset_index(drop=True)
    table.seed_values = table.seed_values[table.seed_values["entry"].isin(keep)].reset_index(drop=True)
    kept = set(keep)
    table.footnotes = [n for n in table.footnotes if not _is_leak_line(n) or n.split(":")[0] in kept]
    return table


def _is_leak_line(note: str) -> bool:
    return LEAK_TEXT in note


# ---------------------------------------------------------------------------------------------------------------
# Δ against the published numbers or another method
# ---------------------------------------------------------------------------------------------------------------
# Every published number comes from the reference code's default precision (fp16 CLIP weights and prompts, plain SGD;
# protocol.md §4.5); our runs match it only in that mode.
REFERENCE_PRECISION = "reference-fp16"


def _paper_metric(kind: str, group: str, is_average: bool) -> str | None:
    if kind == "base2novel" and group in ("base", "novel", "hm"):
        return f"avg_{group}" if is_average else group
    if kind in ("cross_dataset", "domain_generalization") and group == "acc":
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
        and (table.kind == "few_shot" or set(r["shots"]) == {PAPER_SHOTS})
    }
    counted = table.cells[table.cells["in_average"].fillna(False).astype(bool) & table.cells["mean"].notna()]
    averaged = {k: frozenset(g["row"]) for k, g in counted.groupby(["entry", "group"])}
    paper_rows = PAPER_AVERAGE_ROWS.get(table.kind)
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
    if table.cells["delta"].notna().any():
        table.footnotes.append(
            "(±x.xx M) = Δ ours − published (percentage points); M = confidence of the published number: "
            "✓ verified, T transcribed, L low (results/reference/README.md)."
        )
    if (
        table.cells["is_average"].astype(bool).any()
        and not table.cells.loc[table.cells["is_average"], "delta"].notna().any()
    ):
        if table.cells["delta"].notna().any():
            table.footnotes.append("No Δ on the Average row: it is not over the datasets the published average uses.")
    skipped = sorted(set(info.index) - comparable)
    if skipped:
        table.footnotes.append(f"No Δ vs paper for {', '.join(skipped)}: the published numbers use ViT-B/16, 16 shots.")
    compared = sorted(set(table.cells.loc[table.cells["delta"].notna(), "entry"]))
    by_precision: dict[str, list[str]] = {}
    for e in compared:
        if info.loc[e, "precision"] != REFERENCE_PRECISION:
            by_precision.setdefault(str(info.loc[e, "precision"]), []).append(e)
    if by_precision:
        ran = "; ".join(f"{', '.join(es)} ran {p}" for p, es in sorted(by_precision.items()))
        table.footnotes.append(
            f"Precision differs from the published numbers' (the reference code's fp16 weights and prompts, "
            f"protocol.md §4.5): {ran}. Δ includes that difference."
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
    table.footnotes.append(f"(±x.xx) = Δ against {ref} (percentage points).")
    return True


# ---------------------------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------------------------
def build_report(results: Results, protocols: Sequence[str] | None = None, options: Options | None = None) -> Report:
    """Every requested table (default: all present) with Δ columns and the report footer."""
    options = options or Options()
    frame = prepare(results.tidy, options)
    if frame.empty:
        raise UserError(f"no complete runs in '{results.results_dir}' match the selection ({_status_line(results)})")
    wanted = list(protocols) if protocols else list(REPORT_PROTOCOLS)
    bad = [p for p in wanted if p not in REPORT_PROTOCOLS]
    if bad:
        raise UserError(f"unknown protocol '{bad[0]}'.{suggest(bad[0], REPORT_PROTOCOLS)}")
    full_tables = {k: t for k in KINDS if (t := build_table(frame, k, options)) is not None}
    tables: list[Table] = []
    for kind, table in full_tables.items():
        if kind in wanted:
            tables.append(_main_view(_copy(table), options))
    if "ablation" in wanted:
        tables.extend(t for k in KINDS if k in full_tables and (t := ablation_table(full_tables[k])) is not None)
    if protocols:
        missing = [p for p in protocols if not any(t.kind == p and not t.ablation for t in tables) and p != "ablation"]
        if "ablation" in protocols and not any(t.ablation for t in tables):
            missing.append("ablation")
        if missing:
            present = [t.name for t in tables] or [k for k in full_tables]
            raise UserError(
                f"no complete results for protocol '{missing[0]}' in '{results.results_dir}' "
                f"(present: {', '.join(present) or 'none'})"
            )
    for t in tables:
        notes = seed_notes(t, options)
        t.footnotes[2:2] = notes
    if not tables:
        raise UserError(f"no complete results to report in '{results.results_dir}' ({_status_line(results)})")
    if options.vs == "paper":
        for t in tables:
            attach_paper(t)
    elif options.vs:
        found = [attach_method(t, options.vs) for t in tables]
        if not any(found):
            names = {e for t in tables for e in t.entries["entry"]} | {
                m for t in tables for m in t.entries["method_label"]
            }
            raise UserError(f"--vs: no method '{options.vs}' in the report.{suggest(options.vs, names)}")
        for t, ok in zip(tables, found):
            if not ok:
                t.footnotes.append(f"No Δ: {options.vs} has no results in this table.")
    return Report(tables=tables, footer=_footer(results), options=options)


def _copy(table: Table) -> Table:
    return Table(**{**table.__dict__, "columns": list(table.columns), "footnotes": list(table.footnotes)})


def _status_line(results: Results) -> str:
    counts = results.status_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "no runs"


def _footer(results: Results) -> list[str]:
    counts = results.status_counts()
    lines = []
    other = {s: n for s, n in counts.items() if s != "complete"}
    if other:
        lines.append(
            f"Runs: {counts.get('complete', 0)} complete; not in the tables: "
            + ", ".join(f"{n} {s}" for s, n in other.items())
            + "."
        )
    if results.unreadable:
        lines.append(f"{len(results.unreadable)} unreadable run.json file(s) skipped (see the log).")
    return lines
