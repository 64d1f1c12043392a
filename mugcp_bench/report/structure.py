"""The report's data model: options, tables (long-form cells plus display order and labels) and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mugcp_bench.protocols import PROTOCOLS, TableShape


@dataclass(frozen=True)
class Options:
    """What the report aggregates and how."""

    rounded: bool = False  # per-seed values rounded to 1 decimal (the reference parser) instead of full precision
    ci: bool = False  # 95% bootstrap intervals (seeds and test images resampled) instead of the std
    ci_seed: int = 0  # the bootstrap's random seed: same seed, same intervals
    ci_replicates: int = 1000
    seeds: tuple[int, ...] | None = None  # expected seeds (others are dropped); default: those present per method
    methods: tuple[str, ...] | None = None  # method labels (a bare method name also selects its variants)
    vs: str | None = None  # "paper" or a method entry to compute Δ against
    by_config: bool = False  # runs of one method with other settings (`run --grid`, --set) are separate entries

    @property
    def value_column(self) -> str:
        return "accuracy_1dp" if self.rounded else "accuracy"


# Footnote kinds in display order. A table collects notes as it is built; they print in this order (insertion order
# within a kind), so no step has to know where another step's notes went.
NOTE_KINDS = (
    "rule",  # how HM / the Average / an ablation Δ is computed
    "values",  # what the numbers are (mean ± std of which per-seed values)
    "ci",  # how the bootstrap intervals were computed, and for which runs they could not pair the images
    "seeds",  # the (k/n) legend: expected seeds of the entries with missing ones
    "incomplete",  # the † legend
    "duplicates",  # several runs of one seed
    "recipes",  # where each recipe comes from, when a method runs under several recipes in one table
    "configs",  # runs with other settings than their recipe's, left out of the table (--by-config shows them)
    "leakage",  # share of MuGCP descriptions naming the true class, one per entry
    "outliers",  # outlier seeds
    "chance",  # seeds near chance
    "delta",  # legend of the Δ column (vs paper or vs a method)
    "delta-ci",  # what the interval on a Δ is
    "paper-average",  # why an Average row has no Δ vs paper
    "paper-skipped",  # entries with no Δ vs paper (other backbone or shots)
    "precision",  # entries whose precision differs from the published numbers'
    "no-delta",  # the --vs method has no results in this table
    "hardest",  # per-class tables: the hardest classes
    "measure",  # efficiency tables: how a column was measured
    "missing",  # runs left out of a table for lack of data
)


@dataclass(frozen=True)
class Note:
    """One footnote: its kind (NOTE_KINDS), its text and the entry it is about (None: the whole table)."""

    kind: str
    text: str
    entry: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOTE_KINDS:
            raise ValueError(f"unknown note kind {self.kind!r}; add it to NOTE_KINDS")


@dataclass
class Column:
    """One displayed column: an entry (method) and a metric group; `delta` marks an ablation Δ column."""

    entry: str
    group: str
    delta: bool = False


@dataclass
class Table:
    """One report table: long-form cells plus the order and labels to display them."""

    kind: str  # a protocol's name (protocols.PROTOCOLS)
    ablation: bool
    title: str
    # entry, row, group, mean, std, ci95 (Student t), n, n_expected, complete, is_average, [ref_value, ref_marker,
    # delta], with --ci [ci_low, ci_high, delta_low, delta_high]; ablation Δ cells name their full_entry
    cells: pd.DataFrame
    rows: list[str]  # row keys (dataset keys, then AVERAGE)
    row_labels: dict[str, str]
    columns: list[Column]
    entries: pd.DataFrame  # one row per entry: entry, method, variant, method_label, setting + SETTING_FIELDS, shots
    group_labels: dict[str, str]
    seed_values: pd.DataFrame  # per-seed values behind the cells: entry, row, group, seed, value
    notes: list[Note] = field(default_factory=list)
    delta_against: str | None = None  # what the Δ column compares with: "paper", an entry, or None
    table_name: str = ""  # overrides `name` (per-class tables)
    row_header: str = "Dataset"  # the first column's heading

    @property
    def name(self) -> str:
        return self.table_name or (f"ablation_{self.kind}" if self.ablation else self.kind)

    @property
    def shape(self) -> TableShape:
        """The layout of the table's protocol (its columns, HM, source row, averaging rule)."""
        return PROTOCOLS[self.kind].table

    def note(self, kind: str, text: str, entry: str | None = None) -> None:
        """Add a footnote."""
        self.notes.append(Note(kind, text, entry))

    def notes_of(self, kind: str) -> list[Note]:
        return [n for n in self.notes if n.kind == kind]

    @property
    def footnotes(self) -> list[str]:
        """The footnote texts in display order (NOTE_KINDS, then insertion order)."""
        return [n.text for n in sorted(self.notes, key=lambda n: NOTE_KINDS.index(n.kind))]

    def cell(self, entry: str, row: str, group: str) -> pd.Series | None:
        """The cell for (entry, row, group), or None."""
        hit = self.cells[(self.cells["entry"] == entry) & (self.cells["row"] == row) & (self.cells["group"] == group)]
        return None if hit.empty else hit.iloc[0]


@dataclass
class RowTable:
    """A plain table with one row per item (the efficiency table): display strings plus the numbers for CSV."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    align: list[str]  # "l" or "r" per column
    data: pd.DataFrame  # the numbers behind the rows, for CSV
    notes: list[Note] = field(default_factory=list)

    def note(self, kind: str, text: str, entry: str | None = None) -> None:
        self.notes.append(Note(kind, text, entry))

    @property
    def footnotes(self) -> list[str]:
        return [n.text for n in sorted(self.notes, key=lambda n: NOTE_KINDS.index(n.kind))]


@dataclass
class Report:
    """All tables of a report and the report-level footer lines."""

    tables: list[Table]
    footer: list[str]
    options: Options
    results: Any = None  # the tidy.Results the report was built from (plots read its training history)
    row_tables: list[RowTable] = field(default_factory=list)  # printed after the tables (--efficiency)
