"""The report's data model: options, tables (long-form cells plus display order and labels) and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


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

    kind: str  # one of protocols.PROTOCOL_NAMES
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
