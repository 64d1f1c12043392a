"""Bootstrap confidence intervals and paired differences for report tables (`report --ci`, `--vs METHOD`).

One replicate resamples the seeds and the test images, both with replacement, and recomputes every cell exactly as
the table does (docs/protocol.md §3):
- seeds: one draw of seed weights per replicate, shared by every cell of the table (a method's seed s and another's
  trained on the same few-shot sample, so they stay paired); a cell's value is the weighted mean over its seeds;
- images: per test set (dataset, class subset, the test list's SHA-256), one draw of n images per replicate, shared
  by every method and seed that scored that list: the paired part. The draw depends only on `--ci-seed` and the test
  set, never on which methods are in the report;
- HM per dataset from the replicate's seed-mean Base and Novel; the Average per §3.2 (base-to-novel: the HM of the
  replicate's mean Base and mean Novel over datasets; otherwise the mean over the rows that count).
The interval is the percentile interval of the replicates. A paired difference A − B is the percentile interval of
the per-replicate differences (same seeds, same images), so a method against itself gives exactly [0, 0].

Runs recorded without per-image predictions (older records) cannot be resampled image by image: their test-set noise
is drawn from a binomial with the recorded accuracy, independently per method (not paired); the report says so.
Everything is numpy and vectorised over replicates: image counts (replicates x n) times the correctness matrix
(n x runs) per test set.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mugcp_bench.protocols import PROTOCOLS, TableShape
from mugcp_bench.report.published import AVERAGE
from mugcp_bench.report.structure import Table
from mugcp_bench.store import predictions

log = logging.getLogger(__name__)

DEFAULT_REPLICATES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class BootstrapConfig:
    replicates: int = DEFAULT_REPLICATES
    seed: int = DEFAULT_SEED  # --ci-seed: same seed, same intervals
    level: float = LEVEL


def _key_int(*parts: object) -> int:
    """A stable 64-bit integer for a tuple of names (never Python's salted hash())."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def image_counts(test_set: str, n: int, config: BootstrapConfig, chunk: int = 256) -> Iterator[np.ndarray]:
    """How often each of the n test images is drawn in each replicate, in chunks of (<= chunk, n) float32.

    Replicate b is the b-th `integers(0, n, n)` call of a generator seeded by (--ci-seed, test set): every method and
    seed scored on this test set sees the same resampled images.
    """
    rng = np.random.default_rng([config.seed, _key_int("images", test_set)])
    for start in range(0, config.replicates, chunk):
        b = min(chunk, config.replicates - start)
        counts = np.empty((b, n), dtype=np.float32)
        for i in range(b):
            counts[i] = np.bincount(rng.integers(0, n, n, dtype=np.uint32), minlength=n)
        yield counts


def seed_weights(seeds: list[int], config: BootstrapConfig) -> np.ndarray:
    """(replicates, len(seeds)) multiplicities of a resample of the seeds with replacement."""
    rng = np.random.default_rng([config.seed, _key_int("seeds", *seeds)])
    k = len(seeds)
    return rng.multinomial(k, np.full(k, 1.0 / k), size=config.replicates).astype(np.float64)


class CorrectnessCache:
    """Per-image correctness vectors read from predictions files (each file read once); problems are remembered."""

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray | None] = {}
        self.unusable: set[str] = set()  # predictions files that could not be used (damaged, wrong hash or size)

    def get(self, path: object, sha256: object, n: object) -> np.ndarray | None:
        if not isinstance(path, str) or not path:
            return None
        if path not in self._cache:
            try:
                p = predictions.read(path, sha256 if isinstance(sha256, str) else None)
                correct = p.correct
                if pd.notna(n) and len(correct) != int(n):
                    raise predictions.PredictionsError(f"{path}: {len(correct)} predictions, the record says n={n}")
                self._cache[path] = correct
            except predictions.PredictionsError as e:
                log.warning("%s; its run is resampled without per-image predictions", e)
                self.unusable.add(path)
                self._cache[path] = None
        return self._cache[path]


@dataclass
class TableReplicates:
    """Bootstrap replicates of every cell of one table."""

    config: BootstrapConfig
    values: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)  # (entry, row, group) -> (B,)
    # (entry, row, group, seed) -> the test set whose image draws it used; None = binomial (no predictions stored)
    test_sets: dict[tuple[str, str, str, int], str | None] = field(default_factory=dict)

    def interval(self, key: tuple[str, str, str]) -> tuple[float, float]:
        rep = self.values.get(key)
        return percentile_interval(rep, self.config.level) if rep is not None else (math.nan, math.nan)

    def difference(self, a: tuple[str, str, str], b: tuple[str, str, str]) -> np.ndarray | None:
        """Per-replicate a − b (paired: same seed weights, same image draws)."""
        if a not in self.values or b not in self.values:
            return None
        return self.values[a] - self.values[b]

    def unpaired_entries(self) -> list[str]:
        """Entries with at least one run resampled without stored predictions."""
        return sorted({k[0] for k, t in self.test_sets.items() if t is None})


def percentile_interval(rep: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    rep = rep[~np.isnan(rep)]
    if rep.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(rep, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def _test_set(row: str, classes: str, n: object, test_sha: object) -> str:
    ident = test_sha if isinstance(test_sha, str) and test_sha else f"n={n}"
    return f"{row}/{classes}/{ident}"


def run_replicates(
    seed_values: pd.DataFrame, config: BootstrapConfig, cache: CorrectnessCache
) -> tuple[dict[tuple[str, str, str, int], np.ndarray], dict[tuple[str, str, str, int], str | None]]:
    """Replicate accuracies (%) of every measured run cell (entry, row, group, seed) -> (B,), and its test set."""
    sv = seed_values.reset_index(drop=True)
    columns: dict[str, list[tuple[tuple[str, str, str, int], np.ndarray]]] = {}
    out: dict[tuple[str, str, str, int], np.ndarray] = {}
    test_sets: dict[tuple[str, str, str, int], str | None] = {}
    for r in sv.itertuples(index=False):
        key = (r.entry, r.row, r.group, int(r.seed))
        classes = getattr(r, "classes", r.group)
        n = getattr(r, "n", np.nan)
        correct = cache.get(getattr(r, "predictions", None), getattr(r, "predictions_sha256", None), n)
        tset = _test_set(r.row, classes, len(correct) if correct is not None else n, getattr(r, "test_sha256", None))
        if correct is None:
            # no per-image predictions: the test-set noise of this run alone, binomial around its accuracy
            test_sets[key] = None
            n_img = int(n) if pd.notna(n) and int(n) > 0 else 0
            if n_img == 0:
                out[key] = np.full(config.replicates, float(r.value))
                continue
            rng = np.random.default_rng([config.seed, _key_int("binomial", tset, *key)])
            p = min(max(float(r.value) / 100.0, 0.0), 1.0)
            out[key] = 100.0 * rng.binomial(n_img, p, size=config.replicates) / n_img
            continue
        test_sets[key] = tset
        columns.setdefault(tset, []).append((key, correct))
    for tset, cols in columns.items():
        n = len(cols[0][1])
        matrix = np.stack([c for _, c in cols], axis=1).astype(np.float32)  # (n, K)
        acc = np.concatenate([counts @ matrix for counts in image_counts(tset, n, config)])  # (B, K)
        acc *= 100.0 / n
        for j, (key, _) in enumerate(cols):
            out[key] = acc[:, j].astype(np.float64)
    return out, test_sets


def table_replicates(
    kind: str, seed_values: pd.DataFrame, cells: pd.DataFrame, config: BootstrapConfig, cache: CorrectnessCache
) -> TableReplicates:
    """Replicates of every cell of a table (measured cells, HM, Average) from its per-seed values."""
    per_run, test_sets = run_replicates(seed_values, config, cache)
    seeds = sorted({int(s) for s in seed_values["seed"].dropna()})
    weights = seed_weights(seeds, config)
    position = {s: i for i, s in enumerate(seeds)}
    result = TableReplicates(config=config, test_sets=test_sets)
    by_cell: dict[tuple[str, str, str], list[int]] = {}
    for entry, row, group, seed in per_run:
        by_cell.setdefault((entry, row, group), []).append(seed)
    for cell, cell_seeds in by_cell.items():
        reps = np.stack([per_run[(*cell, s)] for s in cell_seeds], axis=1)  # (B, S)
        w = weights[:, [position[s] for s in cell_seeds]]
        total = w.sum(axis=1)
        weighted = (w * reps).sum(axis=1) / np.where(total > 0, total, 1.0)
        # a replicate that drew none of this cell's seeds (a cell missing some seeds): all of its seeds, equally
        result.values[cell] = np.where(total > 0, weighted, reps.mean(axis=1))
    _derived(PROTOCOLS[kind].table, cells, result.values)
    return result


def _hm(base: np.ndarray, novel: np.ndarray) -> np.ndarray:
    total = base + novel
    return np.where(total > 0, 2.0 * base * novel / np.where(total > 0, total, 1.0), 0.0)


def _derived(shape: TableShape, cells: pd.DataFrame, values: dict[tuple[str, str, str], np.ndarray]) -> None:
    """HM per dataset and the Average rows, per replicate, following `statistics.derive`."""
    measured = cells[~cells["is_average"].astype(bool) & cells["group"].isin({k[2] for k in values})]
    if shape.harmonic_mean:
        for entry, row in {(k[0], k[1]) for k in values}:
            b, nv = values.get((entry, row, "base")), values.get((entry, row, "novel"))
            if b is not None and nv is not None:
                values[(entry, row, "hm")] = _hm(b, nv)
    counted = measured[measured["in_average"].fillna(False).astype(bool) & measured["mean"].notna()]
    for (entry, group), sub in counted.groupby(["entry", "group"], sort=False):
        reps = [values[(entry, r, group)] for r in sub["row"] if (entry, r, group) in values]
        if reps:
            values[(entry, AVERAGE, group)] = np.mean(np.stack(reps, axis=1), axis=1)
    if shape.harmonic_mean:
        for entry in {k[0] for k in values}:
            b, nv = values.get((entry, AVERAGE, "base")), values.get((entry, AVERAGE, "novel"))
            if b is not None and nv is not None:
                values[(entry, AVERAGE, "hm")] = _hm(b, nv)


# ---------------------------------------------------------------------------------------------------------------
# Attaching intervals to a report table
# ---------------------------------------------------------------------------------------------------------------
def attach_intervals(table: Table, config: BootstrapConfig, cache: CorrectnessCache) -> TableReplicates:
    """Columns ci_low / ci_high on every cell and, where the table has a Δ, delta_low / delta_high: the paired
    interval of the difference (vs a method; ablation Δ vs the full method) or the cell's interval shifted by the
    published number (vs paper). Adds the notes that say how."""
    cells = table.cells.copy()
    is_delta = cells["group"].astype(str).str.startswith("Δ")
    reps = table_replicates(table.kind, table.seed_values, cells[~is_delta], config, cache)
    bounds = [
        reps.interval((e, r, g)) if not d else (math.nan, math.nan)
        for e, r, g, d in zip(cells["entry"], cells["row"], cells["group"], is_delta)
    ]
    cells["ci_low"] = [b[0] for b in bounds]
    cells["ci_high"] = [b[1] for b in bounds]
    if is_delta.any():  # ablation: variant − full method, paired
        for i in cells.index[is_delta]:
            c = cells.loc[i]
            diff = reps.difference((c["entry"], c["row"], c["group"][1:]), (c["full_entry"], c["row"], c["group"][1:]))
            if diff is not None:
                cells.loc[i, ["ci_low", "ci_high"]] = percentile_interval(diff, config.level)
    if "delta" in cells and table.delta_against is not None:
        low, high = [], []
        for c in cells.itertuples(index=False):
            lo = hi = math.nan
            if pd.notna(c.delta) and table.delta_against == "paper":
                lo, hi = c.ci_low - c.ref_value, c.ci_high - c.ref_value
            elif pd.notna(c.delta):
                diff = reps.difference((c.entry, c.row, c.group), (table.delta_against, c.row, c.group))
                if diff is not None:
                    lo, hi = percentile_interval(diff, config.level)
            low.append(lo)
            high.append(hi)
        cells["delta_low"], cells["delta_high"] = low, high
    table.cells = cells
    _interval_notes(table, reps, cache)
    return reps


def _interval_notes(table: Table, reps: TableReplicates, cache: CorrectnessCache) -> None:
    config = reps.config
    table.note(
        "ci",
        f"Intervals [a, b]: {round(100 * config.level)}% percentile bootstrap interval over {config.replicates} "
        f"replicates (--ci-seed {config.seed}) that resample the seeds and the test images (the same draws for "
        "every method); HM and the Average are recomputed in each replicate.",
    )
    if table.ablation:
        table.note("delta-ci", "On a Δ: the paired interval of variant − full method; * = it excludes 0.")
    elif table.delta_against == "paper":
        table.note(
            "delta-ci", "On a Δ: the interval of ours − published (the published number as given); * = it excludes 0."
        )
    elif table.delta_against is not None:
        table.note(
            "delta-ci",
            f"On a Δ: the paired interval of the difference to {table.delta_against} (the same resampled seeds and "
            "test images for both); * = it excludes 0.",
        )
    unpaired = [e for e in reps.unpaired_entries() if e in set(table.entries["entry"])]
    if unpaired:
        table.note(
            "ci",
            f"Runs without stored per-image predictions ({', '.join(unpaired)}; older records): their test images "
            "are resampled as a binomial at the recorded accuracy, not paired with other methods.",
        )
    bad = set(table.seed_values["predictions"].dropna()) & cache.unusable if "predictions" in table.seed_values else ()
    if bad:
        table.note(
            "ci", f"{len(bad)} predictions file(s) unusable (damaged or not the recorded ones; see the log): as above."
        )
