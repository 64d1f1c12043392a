"""Aggregation rules (docs/protocol.md §3) checked on the published tables and on small synthetic stores."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mugcp_bench.protocols import real_suite
from mugcp_bench.report.aggregate import build_table, prepare
from mugcp_bench.report.published import AVERAGE, load_published
from mugcp_bench.report.statistics import derive, hm, seed_cells, t_halfwidth
from mugcp_bench.report.structure import Options
from mugcp_bench.report.tidy import records_to_frames
from mugcp_bench.store.records import Record
from tests.factories import evaluation, make_key, make_record

FIVE = ["zsclip", "coop", "cocoop", "maple", "promptsrc"]
# DePT's README gives its four compositions per dataset too (published.csv)
WITH_CELLS = [*FIVE, "coop+dept", "cocoop+dept", "kgcoop+dept", "maple+dept"]
B2N_DATASETS = list(real_suite().base2novel)


def published_cells(protocol: str, method: str, groups: dict[str, str]) -> pd.DataFrame:
    """Per-dataset cells of one published row, in the shape `derive` takes (metric -> group)."""
    pub = load_published()
    sub = pub[(pub["protocol"] == protocol) & (pub["method"] == method) & pub["metric"].isin(list(groups))]
    return pd.DataFrame(
        {
            "entry": method,
            "row": sub["dataset_key"].to_numpy(),
            "group": sub["metric"].map(groups).to_numpy(),
            "mean": sub["value"].to_numpy(),
            "complete": True,
            "in_average": (sub["dataset_key"] != "imagenet").to_numpy() if protocol != "base2novel" else True,
        }
    )


def published_value(protocol: str, method: str, metric: str) -> float:
    pub = load_published()
    hit = pub[(pub["protocol"] == protocol) & (pub["method"] == method) & (pub["metric"] == metric)]
    assert len(hit) == 1, (protocol, method, metric)
    return float(hit["value"].iloc[0])


def average_of(derived: pd.DataFrame, group: str) -> float:
    row = derived[(derived["row"] == AVERAGE) & (derived["group"] == group)]
    assert len(row) == 1
    return float(row["mean"].iloc[0])


def test_every_method_with_published_b2n_cells_is_checked() -> None:
    pub = load_published()
    per_dataset = pub[(pub["protocol"] == "base2novel") & (pub["dataset"] != "average")]
    assert sorted(per_dataset["method"].unique()) == sorted(WITH_CELLS)


@pytest.mark.parametrize("method", WITH_CELLS)
def test_b2n_average_rows_recompute_from_published_cells(method: str) -> None:
    cells = published_cells("base2novel", method, {"base": "base", "novel": "novel"})
    assert sorted(cells["row"].unique()) == sorted(B2N_DATASETS)
    derived = derive("base2novel", cells)
    for group in ("base", "novel", "hm"):
        ours, published = average_of(derived, group), published_value("base2novel", method, f"avg_{group}")
        assert abs(ours - published) <= 0.01, (method, group, ours, published)
    # the per-dataset HM recomputes from its B and N: within 0.01 (B and N rounded to 0.005 move the HM by at most
    # 0.005, its own rounding another 0.005; DePT's HMs come from unrounded B and N, the others' within 0.005)
    pub_hm = published_cells("base2novel", method, {"hm": "hm"}).set_index("row")["mean"]
    ours_hm = derived[(derived["group"] == "hm") & (derived["row"] != AVERAGE)].set_index("row")["mean"]
    assert (ours_hm - pub_hm).abs().max() <= (0.005 if method in FIVE else 0.01)


# Recomputed from the published base-to-novel cells (results/reference/; docs/protocol.md §3.2): mean B, mean N,
# HM of means, mean of per-dataset HMs
TEST_VECTORS = {
    "zsclip": (69.345, 74.218, 71.70, 71.59),
    "coop": (82.686, 63.225, 71.66, 70.83),
    "cocoop": (80.471, 71.693, 75.83, 75.43),
    "maple": (82.281, 75.141, 78.55, 78.27),
    "promptsrc": (84.255, 76.097, 79.97, 79.77),
}


@pytest.mark.parametrize("method", FIVE)
def test_hm_of_means_not_mean_of_hms(method: str) -> None:
    mean_b, mean_n, hm_means, mean_hms = TEST_VECTORS[method]
    derived = derive("base2novel", published_cells("base2novel", method, {"base": "base", "novel": "novel"}))
    assert average_of(derived, "base") == pytest.approx(mean_b, abs=0.0005)
    assert average_of(derived, "novel") == pytest.approx(mean_n, abs=0.0005)
    assert average_of(derived, "hm") == pytest.approx(hm_means, abs=0.005)
    per_dataset_hms = derived[(derived["group"] == "hm") & (derived["row"] != AVERAGE)]["mean"]
    assert per_dataset_hms.mean() == pytest.approx(mean_hms, abs=0.005)  # the wrong rule gives another number
    assert abs(per_dataset_hms.mean() - average_of(derived, "hm")) > 0.1


def test_protocol_test_vector_clip() -> None:
    """docs/protocol.md §3.2: CLIP's cells give mean B 69.345, mean N 74.218, HM of means 71.70 (not 71.59)."""
    assert hm(69.345, 74.218) == pytest.approx(71.70, abs=0.005)
    derived = derive("base2novel", published_cells("base2novel", "zsclip", {"base": "base", "novel": "novel"}))
    assert round(average_of(derived, "hm"), 2) == 71.70


@pytest.mark.parametrize("method", FIVE)
@pytest.mark.parametrize("protocol,n_targets", [("cross_dataset", 10), ("domain_generalization", 4)])
def test_transfer_averages_recompute_from_published_cells(protocol: str, method: str, n_targets: int) -> None:
    cells = published_cells(protocol, method, {"acc": "acc"})
    assert "imagenet" in set(cells["row"])  # the source column is in the table ...
    assert int(cells["in_average"].sum()) == n_targets  # ... but not in the average
    derived = derive(protocol, cells)
    ours, published = average_of(derived, "acc"), published_value(protocol, method, "avg")
    assert abs(ours - published) <= 0.01, (protocol, method, ours, published)
    avg_row = derived[derived["row"] == AVERAGE].iloc[0]
    assert avg_row["n_rows"] == n_targets and bool(avg_row["complete"])


def test_seed_cells_sample_std_ci_and_missing_seeds() -> None:
    values = pd.DataFrame(
        {
            "entry": ["a", "a", "a", "a", "a", "b"],
            "row": ["x", "x", "x", "y", "y", "x"],
            "group": "acc",
            "seed": [1, 2, 3, 1, 2, 1],
            "value": [70.0, 71.0, 72.0, 50.0, 52.0, 60.0],
        }
    )
    cells = seed_cells(values, ["entry", "row", "group"]).set_index(["entry", "row"])
    x, y, b = cells.loc[("a", "x")], cells.loc[("a", "y")], cells.loc[("b", "x")]
    assert x["mean"] == 71.0 and x["std"] == pytest.approx(1.0)  # ddof=1
    assert x["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert bool(x["complete"]) and x["n"] == 3 and x["n_expected"] == 3
    assert not bool(y["complete"]) and y["n"] == 2 and y["n_expected"] == 3  # seed 3 missing for method a
    assert b["n"] == 1 and math.isnan(b["std"]) and math.isnan(b["ci95"]) and bool(b["complete"])
    assert math.isnan(t_halfwidth(1.0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Through the tidy table: HM from seed means, incomplete averages, --seeds, --rounded
# ---------------------------------------------------------------------------------------------------------------
def b2n_record(
    method: str, dataset: str, seed: int, base: float, novel: float, variant: str = "", n_classes: int | None = None
) -> Record:
    key = make_key(method=method, variant=variant, train_dataset=dataset, seed=seed)
    evs = [
        evaluation("base2novel", dataset, c, v, 100, exact=True, n_classes=n_classes)
        for c, v in (("base", base), ("novel", novel))
    ]
    return make_record(key, evaluations=evs, id=f"{method}{dataset}{seed}")


def b2n_table(records: list[Record], options: Options | None = None):
    from pathlib import Path

    _, tidy = records_to_frames([(Path("/nonexistent") / r.id, r) for r in records])
    options = options or Options()
    return build_table(prepare(tidy, options), "base2novel", options)


def test_hm_uses_seed_means_not_per_seed_hms() -> None:
    records = [b2n_record("coop", "dtd", 1, 90.0, 30.0), b2n_record("coop", "dtd", 2, 50.0, 70.0)]
    table = b2n_table(records)
    got = table.cell("coop", "dtd", "hm")["mean"]
    assert got == pytest.approx(hm(70.0, 50.0))
    assert got != pytest.approx(np.mean([hm(90.0, 30.0), hm(50.0, 70.0)]))


def test_average_flagged_when_a_cell_or_dataset_is_missing() -> None:
    records = [b2n_record("coop", ds, s, 80.0 + s, 70.0) for ds in ("dtd", "eurosat") for s in (1, 2, 3)]
    records += [b2n_record("maple", ds, s, 82.0, 72.0 + s) for ds in ("dtd", "eurosat") for s in (1, 2, 3)]
    records = [r for r in records if r.id != "coopeurosat3"]  # coop misses one seed on EuroSAT
    records += [b2n_record("cocoop", "dtd", s, 81.0, 71.0) for s in (1, 2, 3)]  # cocoop misses a whole dataset
    table = b2n_table(records)
    cell = table.cell("coop", "eurosat", "base")
    assert (cell["n"], cell["n_expected"], bool(cell["complete"])) == (2, 3, False)
    assert cell["mean"] == pytest.approx(81.5)  # mean of the seeds present, flagged (never padded)
    assert not bool(table.cell("coop", AVERAGE, "hm")["complete"])
    assert not bool(table.cell("cocoop", AVERAGE, "hm")["complete"])  # one dataset of two
    assert bool(table.cell("maple", AVERAGE, "hm")["complete"])
    assert table.cell("cocoop", AVERAGE, "base")["n_rows"] == 1


def test_outlier_seed_is_named_and_kept_in_the_mean() -> None:
    # CoOp#24: DTD seeds at 12 / 15 / 63 %; here novel seeds 61.8, 12.3, 63.1 and base seeds within a point
    novel = {1: 61.8, 2: 12.3, 3: 63.1}
    records = [b2n_record("coop", "dtd", s, 80.0 + 0.3 * s, novel[s]) for s in (1, 2, 3)]
    records += [b2n_record("maple", "dtd", s, 80.0, 70.0 + 3.0 * s) for s in (1, 2, 3)]  # spread, no outlier
    table = b2n_table(records)
    (note,) = [n.text for n in table.notes_of("outliers")]
    assert "coop DTD Novel seed 2: 12.30 (other seeds 61.80, 63.10)" in note
    assert "maple" not in note and "Base" not in note
    assert table.cell("coop", "dtd", "novel")["mean"] == pytest.approx(np.mean(list(novel.values())))
    assert not table.notes_of("chance")  # no class count recorded: no chance test


def test_near_chance_seed_is_named() -> None:
    # a diverged run: 4.5 % and 5 % on 24 classes (chance 4.17 %, SE 2 points on 100 images); one seed of two
    records = [
        b2n_record("coop", "dtd", 1, 80.0, 60.0, n_classes=24),
        b2n_record("coop", "dtd", 2, 4.5, 5.0, n_classes=24),
    ]
    table = b2n_table(records)
    (note,) = [n.text for n in table.notes_of("chance")]
    assert note.startswith("Seeds within one standard error of chance")
    assert "coop DTD Base seed 2: 4.50 (chance 4.17)" in note and "coop DTD Novel seed 2: 5.00 (chance 4.17)" in note
    assert "seed 1" not in note


def test_seeds_option_sets_expected_seeds_and_drops_others() -> None:
    records = [b2n_record("coop", "dtd", s, 80.0 + s, 70.0) for s in (1, 2, 4)]
    table = b2n_table(records, Options(seeds=(1, 2, 3)))
    cell = table.cell("coop", "dtd", "base")
    assert (cell["n"], cell["n_expected"], bool(cell["complete"])) == (2, 3, False)
    assert cell["mean"] == pytest.approx(81.5)


def test_rounded_uses_one_decimal_per_seed_values() -> None:
    records = [b2n_record("coop", "dtd", 1, 80.04, 70.0), b2n_record("coop", "dtd", 2, 80.04, 70.0)]
    assert b2n_table(records).cell("coop", "dtd", "base")["mean"] == pytest.approx(80.04)
    assert b2n_table(records, Options(rounded=True)).cell("coop", "dtd", "base")["mean"] == pytest.approx(80.0)


def test_one_method_under_two_settings_gets_two_columns_and_paper_delta_only_for_vit_b16() -> None:
    from mugcp_bench.report.comparison import attach_paper

    records = [b2n_record("coop", "dtd", s, 79.0 + s, 41.0) for s in (1, 2, 3)]
    for s in (1, 2, 3):
        r = b2n_record("coop", "dtd", s, 70.0, 40.0)
        r.key = dataclasses.replace(r.key, backbone="ViT-B-32")
        r.id += "b32"
        records.append(r)
    table = b2n_table(records)
    assert list(table.entries["entry"]) == ["coop (ViT-B-16)", "coop (ViT-B-32)"]
    assert table.cell("coop (ViT-B-32)", "dtd", "base")["mean"] == 70.0
    attach_paper(table)
    assert table.cell("coop (ViT-B-16)", "dtd", "base")["delta"] == pytest.approx(81.0 - 79.44)
    assert math.isnan(table.cell("coop (ViT-B-32)", "dtd", "base")["delta"])
    (skipped,) = table.notes_of("paper-skipped")
    assert "No Δ vs paper for coop (ViT-B-32)" in skipped.text


def test_duplicate_runs_of_one_seed_count_once() -> None:
    records = [b2n_record("coop", "dtd", 1, 80.0, 40.0), b2n_record("coop", "dtd", 2, 82.0, 40.0)]
    rerun = b2n_record("coop", "dtd", 2, 84.0, 40.0)
    rerun.id += "-rerun"
    table = b2n_table([*records, rerun])
    cell = table.cell("coop", "dtd", "base")
    assert cell["n"] == 2 and cell["seeds"] == (1, 2)
    (dup,) = table.notes_of("duplicates")
    assert "1 duplicate run" in dup.text


def test_transfer_tables_name_their_source_dataset() -> None:
    from pathlib import Path

    def xd_record(seed: int) -> Record:
        key = make_key(train_protocol="xd", train_dataset="toy_objects", classes="all", seed=seed)
        evs = [
            evaluation(p, d, "all", a, 100, exact=True)
            for p, d, a in (("source", "toy_objects", 40.0 + seed), ("cross_dataset", "toy_shapes", 30.0 + seed))
        ]
        return make_record(key, evaluations=evs, id=f"xd{seed}")

    _, tidy = records_to_frames([(Path("/nonexistent") / f"xd{s}", xd_record(s)) for s in (1, 2)])
    table = build_table(prepare(tidy, Options()), "cross_dataset", Options())
    assert table.title.startswith("Cross-dataset transfer (source: Toy Objects)")
    (rule,) = table.notes_of("rule")
    assert "the Toy Objects source row is not averaged" in rule.text
    assert table.cell("coop", AVERAGE, "acc")["mean"] == pytest.approx(31.5)  # the source is not averaged


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 29, 200])
def test_the_student_t_quantile_matches_scipy(df: int) -> None:
    """The report computes t quantiles itself (scipy.stats costs a second of imports): the same numbers."""
    from mugcp_bench.report.statistics import t_cdf, t_quantile

    for p in (0.005, 0.025, 0.1, 0.5, 0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
        assert t_cdf(stats.t.ppf(p, df), df) == pytest.approx(p, rel=1e-9)
