"""Report tables from the tidy table: entries (columns), rows, seed and dataset aggregation, footnotes, ablations.

The statistics live in `mugcp_bench.report.statistics`, the data model in `mugcp_bench.report.structure`, the Δ against
published numbers or another method in `mugcp_bench.report.comparison`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mugcp_bench.errors import UserError
from mugcp_bench.protocols import PROTOCOLS, TableShape, short_title
from mugcp_bench.registry import suggest
from mugcp_bench.report.ablation_summary import ablation_summaries
from mugcp_bench.report.bootstrap import BootstrapConfig, CorrectnessCache, attach_intervals
from mugcp_bench.report.comparison import attach_method, attach_paper
from mugcp_bench.report.published import AVERAGE
from mugcp_bench.report.statistics import derive, seed_cells, unusual_seeds
from mugcp_bench.report.structure import Column, Options, Report, Table
from mugcp_bench.report.tidy import Results, dataset_display, dataset_key, dataset_rank

log = logging.getLogger(__name__)


# One table per protocol, fed by the evaluations (run.json `evaluations[].protocol`) of that name; "source" = the
# source-dataset accuracy of the xd run, shown as a row of the cross-dataset and DG tables but never averaged.
def report_protocols() -> tuple[str, ...]:
    """The tables a report can show: every protocol (read when asked: a plugin may add one), and the ablations."""
    return (*PROTOCOLS, "ablation")


GROUP_LABELS = {"base": "Base", "novel": "Novel", "hm": "HM", "acc": "Acc"}
# What makes two runs of one method label different entries (columns) of a table. `origin`: an imported reference
# checkpoint is always its own entry, labelled "(imported)".
SETTING_FIELDS = ("backbone", "pretrained", "activation", "recipe", "precision", "origin")
# A method's place in the tables is its `report_order` (methods/*.py), recorded in each run; records without one
# (written before it was recorded, or by a method not installed) go here, after the methods of the paper tables.
DEFAULT_ORDER = 500.0


# ---------------------------------------------------------------------------------------------------------------
# Entries (table columns): a method label, plus the setting when one label ran under several settings
# ---------------------------------------------------------------------------------------------------------------
def _method_rank(method: str, order: float) -> tuple[float, str]:
    return (DEFAULT_ORDER if pd.isna(order) else float(order), method)


def config_labels(frame: pd.DataFrame) -> pd.Series:
    """Per row, the settings that tell its run apart from other runs of the same method label and setting ("n_ctx=4,
    lr=0.002"; "" where the group has one config): what `report --by-config` adds to the entry."""
    labels = pd.Series("", index=frame.index, dtype=object)
    if "config" not in frame or frame.empty:
        return labels
    for _key, sub in frame.groupby(["method_label", "setting"], sort=False):
        configs = {c: json.loads(c) for c in sub["config"].dropna().unique()}
        if len(configs) < 2:
            continue
        keys = sorted({k for cfg in configs.values() for k in cfg})
        varying = [k for k in keys if len({json.dumps(cfg.get(k), sort_keys=True) for cfg in configs.values()}) > 1]
        named = {c: ", ".join(f"{k}={cfg.get(k)}" for k in varying) for c, cfg in configs.items()}
        labels.loc[sub.index] = sub["config"].map(named).fillna("")
    return labels


def assign_entries(frame: pd.DataFrame, with_shots: bool, by_config: bool = False) -> pd.DataFrame:
    """Add `entry` and `setting` columns: the method label, suffixed with the setting fields that vary for it, and with
    `by_config` the method or training settings that differ between its runs (`config_labels`)."""
    frame = frame.copy()
    fields = [*SETTING_FIELDS, *(["shots"] if with_shots else [])]
    frame["setting"] = ["|".join(str(v) for v in vals) for vals in frame[fields].itertuples(index=False)]
    suffix = pd.Series("", index=frame.index, dtype=object)
    for _label, sub in frame.groupby("method_label", sort=False):
        varying = [f for f in fields if f != "origin" and sub[f].astype(str).nunique() > 1]
        if varying:
            suffix.loc[sub.index] = (
                sub[varying]
                .astype(str)
                .apply(lambda r, v=varying: ", ".join(f"{x}-shot" if f == "shots" else x for f, x in zip(v, r)), axis=1)
            )
    # runs of another config are another entry everywhere: by the settings the user gave (a recipe's own runs have
    # none), or with `by_config` by every setting that differs between the method's runs
    named = config_labels(frame) if by_config else frame.get("overrides", pd.Series("", index=frame.index))
    named = named.fillna("").astype(str)
    frame["setting"] = frame["setting"] + "|" + named
    suffix = (suffix + ", " + named).where((suffix != "") & (named != ""), suffix + named)
    imported = frame["origin"].astype(str) == "imported" if "origin" in frame else pd.Series(False, index=frame.index)
    suffix = suffix.where(~imported, ("imported, " + suffix).where(suffix != "", "imported"))
    label = frame["method_label"].astype(object)
    frame["entry"] = label.where(suffix == "", label + " (" + suffix + ")")
    return frame


def entry_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per entry, in display order (paper methods, others, DCP, MuGCP; variants after their method)."""
    columns = ["entry", "method", "variant", "method_label", "setting", *SETTING_FIELDS]
    info = frame.drop_duplicates("entry")[columns]
    shots = frame.groupby("entry")["shots"].agg(lambda s: tuple(sorted(set(int(x) for x in s.dropna()))))
    ranks = frame.groupby("method")["report_order"].min() if "report_order" in frame else pd.Series(dtype=float)
    colors = frame.dropna(subset=["color"]).groupby("method")["color"].last() if "color" in frame else {}
    info = info.assign(
        shots=info["entry"].map(shots),
        report_order=info["method"].map(ranks),
        color=info["method"].map(lambda m: colors.get(m)),
    )
    order = sorted(
        info.itertuples(index=False),
        key=lambda r: (_method_rank(r.method, r.report_order), r.setting, r.variant != "", r.variant),
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
    keys = {d: dataset_key(str(d)) for d in frame["eval_dataset"].unique()}
    frame["row"] = frame["eval_dataset"].map(keys)
    return frame.reset_index(drop=True)


def _drop_duplicate_seeds(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, int]:
    """Keep the most recently written run when one cell has several complete runs of the same seed."""
    newest_last = frame.sort_values("mtime", kind="stable")
    dup = newest_last.duplicated([*keys, "seed"], keep="last")
    kept = newest_last[~dup].sort_index()  # back to the file order: output never depends on mtimes otherwise
    return kept, int(newest_last.loc[dup, "run_id"].nunique())  # runs, not cells (base + novel are one run)


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
    shape = PROTOCOLS[kind].table
    target = frame[frame["eval_protocol"] == kind]
    if shape.columns == "classes":
        return target[target["classes"].isin(list(shape.classes))]
    if shape.source_row and not target.empty:
        # the ImageNet (source) accuracy of the same runs: a row of its own, not averaged
        source = frame[(frame["eval_protocol"] == "source") & frame["run_id"].isin(set(target["run_id"]))]
        return pd.concat([source, target])
    return target


def assign_groups(frame: pd.DataFrame, shape: TableShape) -> pd.DataFrame:
    """The column group of every row: its class subset, its shot count, or the one accuracy column."""
    if shape.columns == "classes":
        return frame.assign(group=frame["classes"].astype(str))
    if shape.columns == "shots":
        return frame.assign(group=frame["shots"].astype(int).astype(str))
    return frame.assign(group="acc")


def group_labels(shape: TableShape, groups: Sequence[str]) -> dict[str, str]:
    if shape.columns == "shots":
        return {g: f"K={g}" for g in groups}
    return dict(GROUP_LABELS)


def build_table(frame: pd.DataFrame, kind: str, options: Options) -> Table | None:
    """The aggregated table of one protocol from prepared rows (None when the protocol has no rows)."""
    shape = PROTOCOLS[kind].table
    sub = _kind_frame(frame, kind)
    if sub.empty:
        return None
    sub, hidden = _recipe_runs(sub, options)
    sub = assign_entries(sub, with_shots=shape.shots_in_entry, by_config=options.by_config)
    sub = assign_groups(sub, shape)
    sub, n_dup = _drop_duplicate_seeds(sub, ["entry", "row", "group"])
    if options.seeds is not None:
        expected = {e: set(options.seeds) for e in sub["entry"].unique()}
    else:  # the seeds present for the method: its full entry and its ablation variants share them
        family = {k: set(int(x) for x in s.dropna()) for k, s in sub.groupby(["method", "setting"])["seed"]}
        expected = {r.entry: family[(r.method, r.setting)] for r in sub.drop_duplicates("entry").itertuples()}
    cells = seed_cells(sub, ["entry", "row", "group"], expected)
    source_rows = set(sub.loc[sub["eval_protocol"] == "source", "row"])
    cells["in_average"] = ~cells["row"].isin(source_rows)
    cells = derive(shape, cells)

    rows, row_labels = _row_order(sub)
    source_name = " + ".join(sorted(row_labels[k] for k in source_rows)) or "ImageNet"  # the toy world: Toy Objects
    for key in source_rows:
        row_labels[key] = f"{row_labels[key]} (source)"
    n_avg = len([r for r in rows if r not in source_rows])
    row_labels[AVERAGE] = f"Average ({n_avg})"
    rows.append(AVERAGE)

    groups = shape.groups(sub["group"].unique())
    entries = entry_table(sub)
    expected_seeds = {e: sorted(v) for e, v in expected.items()}
    entries["expected_seeds"] = [",".join(str(x) for x in expected_seeds[e]) for e in entries["entry"]]
    seed_values = sub[["entry", "row", "group", "seed", "value"]].reset_index(drop=True)
    for col in ("n", "n_classes"):
        seed_values[col] = pd.to_numeric(sub[col], errors="coerce").to_numpy() if col in sub else np.nan
    for col in ("classes", "predictions", "predictions_sha256", "test_sha256"):  # what the bootstrap resamples
        seed_values[col] = sub[col].to_numpy() if col in sub else None
    table = Table(
        kind=kind,
        ablation=False,
        title=_title(kind, entries).replace("{source}", source_name),
        cells=cells,
        rows=rows,
        row_labels=row_labels,
        columns=[Column(e, g) for e in entries["entry"] for g in groups],
        entries=entries,
        group_labels=group_labels(shape, groups),
        seed_values=seed_values,
    )
    _notes(table, sub, options, n_dup, n_avg, source_name)
    _recipe_notes(table, sub)
    if hidden:
        table.note(
            "configs",
            f"Not in the table: runs with other settings than their recipe's ({'; '.join(hidden)}); "
            "report --by-config shows each setting as its own entry.",
        )
    _seed_flag_notes(table)
    return table


def _recipe_notes(table: Table, sub: pd.DataFrame) -> None:
    """Where one method is in the table under several recipes, where each recipe's settings come from (the
    provenance its runs recorded: repository@commit:config)."""
    if "provenance" not in sub:
        return
    for method, msub in sub.groupby("method", sort=True):
        recipes = msub.drop_duplicates("recipe")
        if len(recipes) < 2:
            continue
        parts = []
        for r in recipes.sort_values("recipe").itertuples(index=False):
            where = r.provenance if isinstance(r.provenance, str) and r.provenance else "our design"
            parts.append(f"{r.recipe}: {where}")
        table.note("recipes", f"Recipes of {method}: {'; '.join(parts)}.")


def _recipe_runs(frame: pd.DataFrame, options: Options) -> tuple[pd.DataFrame, list[str]]:
    """Where a method has runs of its recipe's own settings, leave out its runs with other settings (the user's
    --set / --grid): a method's entry is its recipe, never an average over configs. Returns the kept rows and one
    description per left-out config. With --by-config every config is kept (as its own entry)."""
    if options.by_config or "overrides" not in frame:
        return frame, []
    overrides = frame["overrides"].fillna("").astype(str)
    fields = [f for f in SETTING_FIELDS if f in frame]
    group = frame[["method_label", *fields]].astype(str).agg("|".join, axis=1)
    has_recipe = set(group[overrides == ""])
    hide = (overrides != "") & group.isin(has_recipe)
    hidden = [
        f"{label} with {ov} ({n} run{'s' if n != 1 else ''})"
        for (label, ov), n in frame[hide].groupby(["method_label", overrides[hide]])["run_id"].nunique().items()
    ]
    return frame[~hide], hidden


def _seed_flag_notes(table: Table) -> None:
    """Name the outlier seeds and the near-chance seeds of the table's measured cells (both stay in the mean)."""
    outliers, near_chance = unusual_seeds(table.seed_values)

    def label(f) -> str:
        return f"{f.entry} {table.row_labels.get(f.row, f.row)} {table.group_labels.get(f.group, f.group)}"

    if outliers:
        text = "; ".join(
            f"{label(f)} seed {f.seed}: {f.value:.2f} (other seeds {', '.join(f'{o:.2f}' for o in f.others)})"
            for f in outliers
        )
        table.note("outliers", f"Outlier seeds (beyond 2σ of the other seeds and beyond noise; kept): {text}.")
    if near_chance:
        cells: dict[tuple[str, str, str], list] = {}
        for f in near_chance:
            cells.setdefault((f.entry, f.row, f.group), []).append(f)
        parts = []
        for flags in cells.values():
            seeds = ", ".join(str(f.seed) for f in flags)
            vals = ", ".join(f"{f.value:.2f}" for f in flags)
            plural = "s" if len(flags) > 1 else ""
            parts.append(f"{label(flags[0])} seed{plural} {seeds}: {vals} (chance {flags[0].chance:.2f})")
        table.note("chance", f"Seeds within one standard error of chance (kept): {'; '.join(parts)}.")


def _seed_notes(table: Table, options: Options) -> None:
    """Legend lines for missing-seed flags, naming the expected seeds of the entries that have incomplete cells."""
    shown = {(c.entry, c.group) for c in table.columns}
    cells = table.cells[[(e, g) in shown for e, g in zip(table.cells["entry"], table.cells["group"])]]
    incomplete = cells[~cells["complete"].astype(bool)]
    if incomplete.empty:
        return
    entries = list(dict.fromkeys(incomplete["entry"]))
    expected = table.entries.set_index("entry")["expected_seeds"]
    source = "from --seeds" if options.seeds is not None else "the seeds present for the method"
    per = "; ".join(f"{e}: {expected[e]}" for e in entries)
    table.note("seeds", f"(k/n) = seeds present / expected; expected = {source} ({per}).")
    if incomplete["is_average"].astype(bool).any():
        table.note(
            "incomplete",
            "† = average over cells with missing seeds or datasets (not comparable to a complete average).",
        )


def _title(kind: str, entries: pd.DataFrame) -> str:
    parts = []
    backbones = sorted(set(entries["backbone"].dropna().astype(str)))
    if len(backbones) == 1:
        parts.append(backbones[0])
    if PROTOCOLS[kind].table.shots_in_entry:
        shots = sorted({s for ss in entries["shots"] for s in ss})
        if len(shots) == 1:
            parts.append(f"{shots[0]} shots")
    return PROTOCOLS[kind].title + (f" — {', '.join(parts)}" if parts else "")


def _notes(table: Table, sub: pd.DataFrame, options: Options, n_dup: int, n_avg: int, source: str) -> None:
    table.note("rule", table.shape.rule.format(n=n_avg, source=source))
    value = (
        "per-seed accuracies rounded to 1 decimal (as the reference parser reads them)"
        if options.rounded
        else "full-precision per-seed accuracies"
    )
    if options.ci:
        table.note("values", f"Values: mean [95% bootstrap interval] of {value}.")
    else:
        if (pd.to_numeric(table.cells["n"], errors="coerce").fillna(1) <= 1).all():
            table.note("values", f"Values: {value} of one seed (no spread over seeds).")
        else:
            table.note(
                "values", f"Values: mean ± sample std over seeds (ddof=1) of {value}; – = not defined (one seed)."
            )
    if n_dup:
        table.note(
            "duplicates",
            f"{n_dup} duplicate run(s) of the same seed (different config): the most recently written is used "
            "(--by-config shows each config as its own entry).",
        )
    _leakage_notes(table, sub)


def _leakage_notes(table: Table, sub: pd.DataFrame) -> None:
    leaky = sub[sub["leakage"].notna()]
    for entry, esub in leaky.groupby("entry", sort=True):  # stable order, whatever the files' mtimes
        weights = esub["n"].astype(float).fillna(1.0)
        overall = 100 * np.average(esub["leakage"], weights=weights)
        line = f"{entry}: {overall:.1f}% of descriptions name the true class"
        if table.shape.columns == "classes":
            parts = []
            for cls in table.shape.classes:
                c = esub[esub["classes"] == cls]
                if len(c):
                    parts.append(
                        f"{cls} {100 * np.average(c['leakage'], weights=c['n'].astype(float).fillna(1.0)):.1f}%"
                    )
            if parts:
                line += f" ({', '.join(parts)})"
        table.note("leakage", line + ".", entry=entry)


def ablation_table(table: Table) -> Table | None:
    """Full method vs each of its `<method>-no-X` variants, with Δ = variant − full on the main metric."""
    info = table.entries
    full = info[info["variant"] == ""]
    variants = info[info["variant"] != ""]
    groups = table.shape.headline(list(table.group_labels))
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
                            "full_entry": f.entry,
                        }
                    )
    if not columns:
        return None
    used = {c.entry for c in columns}
    abl_cells = pd.concat([cells[cells["entry"].isin(used)], pd.DataFrame(delta_cells)], ignore_index=True)
    group_labels = dict(table.group_labels)
    group_labels.update({f"Δ{g}": f"Δ {table.group_labels[g]}" for g in groups})
    metric = table.shape.metric
    abl = Table(
        kind=table.kind,
        ablation=True,
        title=f"Ablation ({short_title(table.kind)}): full method vs variants, Δ {metric}",
        cells=abl_cells,
        rows=list(table.rows),
        row_labels=dict(table.row_labels),
        columns=columns,
        entries=info[info["entry"].isin(used)].reset_index(drop=True),
        group_labels=group_labels,
        seed_values=table.seed_values[table.seed_values["entry"].isin(used)],
    )
    abl.note(
        "rule",
        f"Δ = variant − full method ({metric}, percentage points); "
        "a variant named method-no-X has component X switched off.",
    )
    abl.notes += [n for n in table.notes if n.kind == "values" or (n.kind == "leakage" and n.entry in used)]
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
    table.notes = [n for n in table.notes if n.entry is None or n.entry in set(keep)]
    return table


# ---------------------------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------------------------
def build_report(results: Results, protocols: Sequence[str] | None = None, options: Options | None = None) -> Report:
    """Every requested table (default: all present) with Δ columns and the report footer."""
    options = options or Options()
    frame = prepare(results.tidy, options)
    if frame.empty:
        raise UserError(f"no complete runs in '{results.results_dir}' match the selection ({_status_line(results)})")
    known = report_protocols()
    wanted = list(protocols) if protocols else list(known)
    bad = [p for p in wanted if p not in known]
    if bad:
        raise UserError(f"unknown protocol '{bad[0]}'.{suggest(bad[0], known)} Protocols: {', '.join(known)}")
    full_tables = {k: t for k in PROTOCOLS if (t := build_table(frame, k, options)) is not None}
    tables: list[Table] = []
    for kind, table in full_tables.items():
        if kind in wanted:
            tables.append(_main_view(_copy(table), options))
    if "ablation" in wanted:
        tables.extend(t for k in PROTOCOLS if k in full_tables and (t := ablation_table(full_tables[k])) is not None)
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
        _seed_notes(t, options)
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
                t.note("no-delta", f"No Δ: {options.vs} has no results in this table.")
    if options.ci:
        config = BootstrapConfig(replicates=options.ci_replicates, seed=options.ci_seed)
        cache = CorrectnessCache()
        for t in tables:
            attach_intervals(t, config, cache)
    return Report(
        tables=tables,
        footer=_footer(results),
        options=options,
        results=results,
        row_tables=ablation_summaries(tables),  # per component: Δ of the dataset average, mean ± std over seeds
    )


def _copy(table: Table) -> Table:
    return Table(**{**table.__dict__, "columns": list(table.columns), "notes": list(table.notes)})


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
