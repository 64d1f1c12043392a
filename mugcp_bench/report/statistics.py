"""Seed and dataset aggregation (docs/protocol.md §3): the statistics behind every report cell.

Two stages, kept apart so the dataset stage can be checked on published cells:
1. seed stage (`seed_cells`): per cell (method entry x dataset x metric) mean, sample std (ddof=1), n seeds,
   Student-t 95% half-width, and whether every expected seed is present;
2. dataset stage (`derive`): per-dataset HM from the seed-MEAN base and novel, and the Average row: for
   base-to-novel the HM of the mean base and the mean novel over datasets (never the mean of per-dataset HMs);
   otherwise the mean over the rows that count (cross-dataset and DG targets, the source dataset excluded).
Outlier and near-chance seeds are found here too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mugcp_bench.protocols import PROTOCOLS, TableShape
from mugcp_bench.report.published import AVERAGE


def hm(base: float, novel: float) -> float:
    """Harmonic mean 2·B·N/(B+N) (NaN if either is NaN, 0 if both are 0)."""
    if base is None or novel is None or math.isnan(base) or math.isnan(novel):
        return math.nan
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c if abs(c) > tiny else 1.0 + num / tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * (f - 1.0)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t (what scipy.stats.t.ppf gives, to ~1e-12), by bisection on `t_cdf`; kept
    here so that a report never waits a second for scipy.stats to import."""
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def t_halfwidth(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean of n values (NaN for n < 2)."""
    if n < 2 or std is None or math.isnan(std):
        return math.nan
    return t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)


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
def derive(shape: TableShape | str, cells: pd.DataFrame) -> pd.DataFrame:
    """Add per-dataset HM rows (tables whose shape has `harmonic_mean`) and the Average row per entry and group.

    `shape`: the table's `TableShape` (or its protocol's name). `cells` has columns entry, row, group, mean,
    complete, in_average (others are carried); HM groups are "base" and "novel", and the Average HM is
    hm(mean base, mean novel). A method's Average is marked incomplete when any of its cells is incomplete or it lacks
    a row that another method has.
    """
    shape = PROTOCOLS[shape].table if isinstance(shape, str) else shape
    cells = cells.copy()
    for col, default in (("n", 1), ("n_expected", 1), ("std", np.nan), ("ci95", np.nan), ("is_average", False)):
        if col not in cells:
            cells[col] = default
    cells["is_average"] = False
    parts = [cells]
    if shape.harmonic_mean:
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
    if shape.harmonic_mean and not avg.empty:
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


# A seed is an outlier when it lies beyond 2σ of its cell's other seeds and further from their mean than both 5 points
# and 3 binomial standard errors of its test set (two close seeds have a tiny σ; small test sets are noisy). A seed is
# near chance when it is within one binomial standard error of chance (or below it): e.g. a diverged run. Both stay
# in the mean; the table names them (huge seed swings are the most reported reproduction problem, e.g.
# KaiyangZhou/CoOp#24: DTD seeds at 12 / 15 / 63 %).
OUTLIER_SIGMAS = 2.0
OUTLIER_MIN_GAP = 5.0


def _binomial_se(p_percent: float, n: float) -> float:
    """Standard error (points) of an accuracy of p % measured on n images."""
    if not n or pd.isna(n):
        return 0.0
    p = min(max(p_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / float(n))


@dataclass(frozen=True)
class SeedFlag:
    """A seed worth naming under a table: an outlier (with the cell's other seeds) or one near chance."""

    entry: str
    row: str
    group: str
    seed: int
    value: float
    others: tuple[float, ...] = ()  # outliers: the cell's other seeds
    chance: float = math.nan  # near chance: the chance level (%)


def unusual_seeds(seed_values: pd.DataFrame) -> tuple[list[SeedFlag], list[SeedFlag]]:
    """(outlier seeds, near-chance seeds) of the measured cells (not HM, not the Average), in cell order.

    `seed_values`: entry, row, group, seed, value, n (test images), n_classes.
    """
    outliers, near_chance = [], []
    for (entry, row, group), g in seed_values.groupby(["entry", "row", "group"], sort=False):
        if row == AVERAGE or group == "hm":
            continue
        g = g.set_index("seed")
        values = g["value"].astype(float)
        for seed, v in values.items():
            n, k = g.at[seed, "n"], g.at[seed, "n_classes"]
            if pd.notna(k) and k > 1:
                level = 100.0 / float(k)
                if v <= level + _binomial_se(level, n):
                    near_chance.append(SeedFlag(entry, row, group, int(seed), float(v), chance=level))
            if len(values) < 3:
                continue
            others = values.drop(seed)
            gap = abs(v - others.mean())
            if gap > max(OUTLIER_SIGMAS * others.std(ddof=1), OUTLIER_MIN_GAP, 3 * _binomial_se(others.mean(), n)):
                outliers.append(SeedFlag(entry, row, group, int(seed), float(v), others=tuple(others)))
    return outliers, near_chance
