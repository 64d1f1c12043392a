"""Render report tables: rich terminal table, Markdown, LaTeX (booktabs), CSV (tidy long form or pivoted).

Cells read "mean ± spread (k/n) (Δ M)": spread = seed std (with --ci the 95% bootstrap interval "[a, b]", on
every cell), (k/n) = seeds present / expected when some are missing, † on an Average that includes incomplete
cells, Δ against the published number (M = its confidence marker) or another method (with --ci followed by its
interval; * = the interval excludes 0). The best mean per row and metric is bold.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import pandas as pd
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from mugcp_bench.report.published import AVERAGE
from mugcp_bench.report.structure import Column, Options, Report, RowTable, Table

FORMATS = ("table", "md", "latex", "csv")
SUFFIX_FORMATS = {".md": "md", ".markdown": "md", ".tex": "latex", ".csv": "csv", ".txt": "table"}
DECIMALS = 2
TEXT_WIDTH = 120  # the terminal table's width when it is not shown on a terminal (a pipe, a file)


@dataclass
class CellText:
    """The pieces of one displayed cell (format-neutral; renderers join and style them)."""

    mean: str
    spread: str = ""
    flag: str = ""
    delta: str = ""
    bold: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Cell texts
# ---------------------------------------------------------------------------------------------------------------
def _fmt(x: float, signed: bool = False) -> str:
    x = round(float(x), DECIMALS) + 0.0  # no "-0.00"
    return f"{x:+.{DECIMALS}f}" if signed else f"{x:.{DECIMALS}f}"


def best_cells(table: Table) -> set[tuple[str, str, str]]:
    """(entry, group, row) of the best mean per row and metric group (ties all bold; needs two or more values)."""
    best: set[tuple[str, str, str]] = set()
    by_group: dict[str, list[str]] = {}
    for col in table.columns:
        if not col.delta:
            by_group.setdefault(col.group, []).append(col.entry)
    cells = table.cells.set_index(["entry", "group", "row"])["mean"]
    for group, entries in by_group.items():
        if len(entries) < 2:
            continue
        for row in table.rows:
            values = {e: cells.get((e, group, row), math.nan) for e in entries}
            shown = {e: round(v, DECIMALS) for e, v in values.items() if not math.isnan(v)}
            if len(shown) < 2:
                continue
            top = max(shown.values())
            best.update((e, group, row) for e, v in shown.items() if v == top)
    return best


def _interval(low: float, high: float, signed: bool = False) -> str:
    return f"[{_fmt(low, signed)}, {_fmt(high, signed)}]"


def _excludes_zero(low: float, high: float) -> bool:
    return (low > 0 and high > 0) or (low < 0 and high < 0)


def one_seed(table: Table) -> bool:
    """Every cell of the table has one seed: no spread to show anywhere (the values note says so)."""
    n = pd.to_numeric(table.cells.get("n", pd.Series(dtype=float)), errors="coerce")
    return bool(len(n)) and bool((n.fillna(1) <= 1).all())


def cell_text(table: Table, col: Column, row: str, options: Options, best: set[tuple[str, str, str]]) -> CellText:
    """Format-neutral text of one cell ("–" when the method has no value there)."""
    c = table.cell(col.entry, row, col.group)
    if c is None or pd.isna(c["mean"]):
        return CellText(mean="–")
    is_avg = bool(c["is_average"])
    text = CellText(mean=_fmt(c["mean"], signed=col.delta), bold=(col.entry, col.group, row) in best)
    if options.ci and "ci_low" in c.index and pd.notna(c["ci_low"]):
        text.spread = _interval(c["ci_low"], c["ci_high"], signed=col.delta)
        if col.delta and _excludes_zero(c["ci_low"], c["ci_high"]):
            text.spread += "*"
    elif not is_avg and not col.delta and col.group != "hm" and not one_seed(table):
        spread = c["std"]
        text.spread = "± " + ("–" if pd.isna(spread) else _fmt(spread))
    if not bool(c["complete"]):
        text.flag = "†" if is_avg else f"({int(c['n'])}/{int(c['n_expected'])})"
    if "delta" in c.index and not pd.isna(c["delta"]):
        marker = c.get("ref_marker", "") or ""
        delta = _fmt(c["delta"], signed=True) + (" " + marker if marker else "")
        low, high = c.get("delta_low", math.nan), c.get("delta_high", math.nan)
        if pd.notna(low) and pd.notna(high):
            delta += " " + _interval(low, high, signed=True) + ("*" if _excludes_zero(low, high) else "")
        text.delta = f"({delta})"
    return text


def _grid(table: Table, options: Options) -> list[tuple[str, list[CellText]]]:
    best = best_cells(table)
    return [(table.row_labels[r], [cell_text(table, c, r, options, best) for c in table.columns]) for r in table.rows]


def _header_spans(table: Table) -> list[tuple[str, int]]:
    """(entry, number of consecutive columns) for the top header row."""
    spans: list[tuple[str, int]] = []
    for col in table.columns:
        if spans and spans[-1][0] == col.entry:
            spans[-1] = (col.entry, spans[-1][1] + 1)
        else:
            spans.append((col.entry, 1))
    return spans


def _single_group(table: Table) -> bool:
    return all(n == 1 for _, n in _header_spans(table)) and not table.ablation


def _plain(text: CellText) -> str:
    return " ".join(p for p in (text.mean, text.spread, text.flag, text.delta) if p)


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------
def table_markdown(table: Table, options: Options) -> str:
    """One table as a Markdown section: heading, pipe table, footnote bullets."""
    single = _single_group(table)
    heads = [c.entry if single else f"{c.entry} {table.group_labels[c.group]}" for c in table.columns]
    lines = [f"### {table.title}", "", f"| {table.row_header} | " + " | ".join(heads) + " |"]
    lines.append("|---|" + "---:|" * len(heads))
    for (label, texts), row in zip(_grid(table, options), table.rows):
        cells = []
        for t in texts:
            mean = f"**{t.mean}**" if t.bold else t.mean
            cells.append(" ".join(p for p in (mean, t.spread, t.flag, t.delta) if p))
        label = f"**{label}**" if row == AVERAGE else label
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in table.footnotes)
    return "\n".join(lines) + "\n"


def row_table_markdown(table: RowTable) -> str:
    """A plain row table as a Markdown section."""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |"]
    lines.append("|" + "".join("---|" if a == "l" else "---:|" for a in table.align))
    lines.extend("| " + " | ".join(row) + " |" for row in table.rows)
    lines.append("")
    lines.extend(f"- {note}" for note in table.footnotes)
    return "\n".join(lines) + "\n"


def report_markdown(report: Report) -> str:
    """Every table of the report in Markdown, then the report footer."""
    parts = [table_markdown(t, report.options) for t in report.tables]
    parts += [row_table_markdown(t) for t in report.row_tables]
    if report.footer:
        parts.append("\n".join(report.footer) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# LaTeX (booktabs)
# ---------------------------------------------------------------------------------------------------------------
_LATEX_CHARS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "·": r"$\cdot$",
    "−": r"$-$",
    "–": "--",
    "—": "---",
    "Δ": r"$\Delta$",
    "✓": r"\checkmark{}",
    "†": r"$^\dagger$",
    "×": r"$\times$",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "`": "",
}
_NEGATIVE = re.compile(r"(?<![\w.])-(?=\d)")


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the report's symbols (±, Δ, ✓, †, dashes) to LaTeX."""
    text = re.sub(r"-(?=-)", "-\x00", text)  # "--ci-seed": two hyphens, not an en dash
    escaped = "".join(_LATEX_CHARS.get(ch, ch) for ch in text).replace("\x00", "{}")
    return _NEGATIVE.sub(r"$-$", escaped)  # a minus sign, not a hyphen, before a number


def _latex_notes(footnotes: list[str]) -> list[str]:
    """The footnotes under a LaTeX table, one per line."""
    if not footnotes:
        return []
    return [r"\par\smallskip{\footnotesize", "\\\\\n".join(latex_escape(note) for note in footnotes), "}"]


def table_latex(table: Table, options: Options) -> str:
    """One table as a booktabs `table` environment (needs \\usepackage{booktabs, amssymb})."""
    single = _single_group(table)
    n = len(table.columns)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(table.title)}}}"]
    out.append(r"\begin{tabular}{l" + "r" * n + "}")
    out.append(r"\toprule")
    if single:
        out.append(f"{table.row_header} & " + " & ".join(latex_escape(c.entry) for c in table.columns) + r" \\")
    else:
        spans = _header_spans(table)
        top, rules, start = [], [], 2
        for entry, width in spans:
            top.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(entry)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
            start += width
        out.append(" & " + " & ".join(top) + r" \\")
        out.append(" ".join(rules))
        heads = " & ".join(latex_escape(table.group_labels[c.group]) for c in table.columns)
        out.append(f"{table.row_header} & {heads}" + r" \\")
    out.append(r"\midrule")
    for (label, texts), row in zip(_grid(table, options), table.rows):
        if row == AVERAGE:
            out.append(r"\midrule")
        cells = []
        for t in texts:
            mean = rf"\textbf{{{latex_escape(t.mean)}}}" if t.bold else latex_escape(t.mean)
            rest = " ".join(latex_escape(p) for p in (t.spread, t.flag, t.delta) if p)
            cells.append(mean + (" " + rest if rest else ""))
        out.append(latex_escape(label) + " & " + " & ".join(cells) + r" \\")
    out.append(r"\bottomrule")
    out.append(r"\end{tabular}")
    out.extend(_latex_notes(table.footnotes))
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def row_table_latex(table: RowTable) -> str:
    """A plain row table as a booktabs `table` environment."""
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(table.title)}}}"]
    out.append(r"\begin{tabular}{" + "".join(table.align) + "}")
    out.append(r"\toprule")
    out.append(" & ".join(latex_escape(h) for h in table.header) + r" \\")
    out.append(r"\midrule")
    out.extend(" & ".join(latex_escape(c) for c in row) + r" \\" for row in table.rows)
    out.append(r"\bottomrule")
    out.append(r"\end{tabular}")
    out.extend(_latex_notes(table.footnotes))
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def report_latex(report: Report) -> str:
    """Every table as a LaTeX table environment; the footer as comments."""
    parts = [table_latex(t, report.options) for t in report.tables]
    parts += [row_table_latex(t) for t in report.row_tables]
    parts.extend(f"% {line}\n" for line in report.footer)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# rich terminal table
# ---------------------------------------------------------------------------------------------------------------
def _blocks(table: Table, grid: list[tuple[str, list[CellText]]], width: int) -> list[list[int]]:
    """Column indices split into blocks that each fit `width` characters beside the row labels: whole entries
    (all their groups) where they fit, else single columns. Cells are never cut: a column is as wide as its values."""
    single = _single_group(table)
    label_w = max(len(table.row_header), *(len(label) for label, _ in grid))
    widths = []
    for j, col in enumerate(table.columns):
        head = [col.entry] if single else [col.entry, table.group_labels[col.group]]
        widths.append(max(*(len(h) for h in head), *(len(_plain(texts[j])) for _, texts in grid)))
    budget = width - (label_w + 4)  # the label column with its borders and padding
    entries: list[list[int]] = []
    for j, col in enumerate(table.columns):
        if entries and table.columns[entries[-1][0]].entry == col.entry:
            entries[-1].append(j)
        else:
            entries.append([j])
    blocks: list[list[int]] = []
    used, whole = 0, False  # the last block's width, and whether it holds whole entries only
    for cols in entries:
        need = sum(widths[j] + 3 for j in cols)
        if need <= budget:  # a whole entry: beside the previous whole entries if it fits
            if blocks and whole and used + need <= budget:
                blocks[-1].extend(cols)
                used += need
            else:
                blocks.append(list(cols))
                used, whole = need, True
            continue
        whole = False  # an entry too wide on its own: its columns in blocks of their own, never mixed with another
        blocks.append([])
        used = 0
        for j in cols:
            if blocks[-1] and used + widths[j] + 3 > budget:
                blocks.append([])
                used = 0
            blocks[-1].append(j)
            used += widths[j] + 3
    return blocks


def _rich_table(table: Table, grid: list[tuple[str, list[CellText]]], cols: list[int]) -> RichTable:
    single = _single_group(table)
    rt = RichTable(header_style="bold")
    rt.add_column(table.row_header, no_wrap=True)
    for j in cols:
        c = table.columns[j]
        head = c.entry if single else f"{c.entry}\n{table.group_labels[c.group]}"
        rt.add_column(head, justify="right", no_wrap=True)
    for (label, texts), row in zip(grid, table.rows):
        if row == AVERAGE:
            rt.add_section()
        cells = []
        for j in cols:
            t = texts[j]
            cell = Text(t.mean, style="bold green" if t.bold else "")
            for part, style in ((t.spread, "dim"), (t.flag, "yellow"), (t.delta, "cyan")):
                if part:
                    cell.append(" " + part, style=style)
            cells.append(cell)
        rt.add_row(Text(label, style="bold" if row == AVERAGE else ""), *cells)
    return rt


def _row_columns(table: RowTable) -> tuple[list[str], list[int]]:
    """Headers wrapped at their blanks to the width of the column's values (at least their longest word), and each
    column's width: a header never makes a column wider than it must be, a value is never cut."""
    heads, widths = [], []
    for j, head in enumerate(table.header):
        words = head.split()
        w = max(max((len(row[j]) for row in table.rows), default=0), *(len(word) for word in words))
        lines: list[str] = []
        for word in words:
            if lines and len(lines[-1]) + 1 + len(word) <= w:
                lines[-1] += " " + word
            else:
                lines.append(word)
        heads.append("\n".join(lines))
        widths.append(w)
    return heads, widths


def _row_blocks(widths: list[int], width: int) -> list[list[int]]:
    """Column indices in blocks that fit `width`, the first column (what each row is) repeated in every block."""
    if len(widths) <= 1 or sum(w + 3 for w in widths) + 1 <= width:
        return [list(range(len(widths)))]
    blocks: list[list[int]] = [[0]]
    used = widths[0] + 4
    for j in range(1, len(widths)):
        if len(blocks[-1]) > 1 and used + widths[j] + 3 > width:
            blocks.append([0])
            used = widths[0] + 4
        blocks[-1].append(j)
        used += widths[j] + 3
    return blocks


def rich_tables(report: Report, width: int = TEXT_WIDTH) -> list:
    """rich renderables: for each table its title, the table (in blocks of methods that fit `width`) and its
    footnotes, then the report footer."""
    items: list = []
    for table in report.tables:
        grid = _grid(table, report.options)
        blocks = _blocks(table, grid, width)
        for i, cols in enumerate(blocks):
            entries = list(dict.fromkeys(table.columns[j].entry for j in cols))
            part = f" ({i + 1}/{len(blocks)}: {', '.join(entries)})" if len(blocks) > 1 else ""
            items.extend([Text(table.title + part, style="bold"), _rich_table(table, grid, cols)])
        items.extend(Text(note, style="dim") for note in table.footnotes)
        items.append(Text(""))
    for table in report.row_tables:
        heads, widths = _row_columns(table)
        blocks = _row_blocks(widths, width)
        for i, cols in enumerate(blocks):
            rt = RichTable(header_style="bold")
            for j in cols:
                rt.add_column(heads[j], justify="left" if table.align[j] == "l" else "right", no_wrap=True)
            for row in table.rows:
                rt.add_row(*(row[j] for j in cols))
            part = f" ({i + 1}/{len(blocks)})" if len(blocks) > 1 else ""
            items.extend([Text(table.title + part, style="bold"), rt])
        items.extend(Text(note, style="dim") for note in table.footnotes)
        items.append(Text(""))
    items.extend(Text(line, style="yellow") for line in report.footer)
    return items


def report_text(report: Report, width: int = TEXT_WIDTH, color: bool = False) -> str:
    """The rich terminal rendering as a string (ANSI styles only when `color`): tables in blocks of methods that fit
    `width`, notes wrapped to it. The whole table in one piece: `--format md`, `latex` or `csv`."""
    console = Console(
        file=io.StringIO(), width=width, record=True, force_terminal=color, color_system="auto" if color else None
    )
    for item in rich_tables(report, width):
        console.print(item, crop=False)
    return console.export_text(styles=color)


# ---------------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------------
def tidy_cells(report: Report) -> pd.DataFrame:
    """The report in long form: one row per displayed cell, with spread, seed counts and Δ."""
    records = []
    value_type = "rounded_1dp" if report.options.rounded else "full"
    for table in report.tables:
        info = table.entries.set_index("entry")
        for col in table.columns:
            e = info.loc[col.entry]
            for row in table.rows:
                c = table.cell(col.entry, row, col.group)
                if c is None:
                    continue
                few = table.shape.columns == "shots"
                group = col.group.removeprefix("Δ")
                records.append(
                    {
                        "table": table.name,
                        "protocol": table.kind,
                        "entry": col.entry,
                        "method": e["method"],
                        "variant": e["variant"],
                        "method_label": e["method_label"],
                        "backbone": e["backbone"],
                        "pretrained": e["pretrained"],
                        "recipe": e["recipe"],
                        "precision": e["precision"],
                        "dataset": row,
                        "dataset_name": table.row_labels[row],
                        "metric": ("delta_" if col.delta else "") + ("acc" if few else group),
                        "shots": int(group) if few else (e["shots"][0] if len(e["shots"]) == 1 else pd.NA),
                        "is_average": bool(c["is_average"]),
                        "mean": c["mean"],
                        "std": c.get("std"),
                        "ci95": c.get("ci95"),
                        "ci_low": c.get("ci_low"),
                        "ci_high": c.get("ci_high"),
                        "n": int(c["n"]),
                        "n_expected": int(c["n_expected"]),
                        "complete": bool(c["complete"]),
                        "ref_value": c.get("ref_value"),
                        "ref_marker": c.get("ref_marker") or "",
                        "delta": c.get("delta"),
                        "delta_low": c.get("delta_low"),
                        "delta_high": c.get("delta_high"),
                        "value_type": value_type,
                    }
                )
    frame = pd.DataFrame(records)
    for col in ("mean", "std", "ci95", "ci_low", "ci_high", "ref_value", "delta", "delta_low", "delta_high"):
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").round(6)
    return frame


def pivot_cells(report: Report) -> pd.DataFrame:
    """The paper layout as CSV: one row per table and dataset, one column per method and metric (means)."""
    frames = []
    for table in report.tables:
        single = _single_group(table)
        data: dict[str, list] = {"table": [], "dataset": [], "dataset_name": []}
        for row in table.rows:
            data["table"].append(table.name)
            data["dataset"].append(row)
            data["dataset_name"].append(table.row_labels[row])
        for col in table.columns:
            name = col.entry if single else f"{col.entry} {table.group_labels[col.group]}"
            means, deltas = [], []
            for row in table.rows:
                c = table.cell(col.entry, row, col.group)
                means.append(round(float(c["mean"]), 6) if c is not None and not pd.isna(c["mean"]) else math.nan)
                d = c.get("delta") if c is not None else None
                deltas.append(round(float(d), 6) if d is not None and not pd.isna(d) else math.nan)
            data[name] = means
            if any(not math.isnan(d) for d in deltas):
                data[f"{name} Δ"] = deltas
        frames.append(pd.DataFrame(data))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def render(report: Report, fmt: str, pivot: bool = False, width: int = TEXT_WIDTH, color: bool = False) -> str:
    """The report as text in one of FORMATS."""
    if fmt == "md":
        return report_markdown(report)
    if fmt == "latex":
        return report_latex(report)
    if fmt == "csv":
        frame = pivot_cells(report) if pivot else tidy_cells(report)
        if report.row_tables:  # the efficiency numbers as rows of their own (columns the accuracy rows leave empty)
            extra = [t.data.assign(table=t.name) for t in report.row_tables]
            frame = pd.concat([frame, *extra], ignore_index=True)
        return frame.to_csv(index=False, lineterminator="\n")
    if fmt == "table":
        return report_text(report, width=width, color=color)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
