"""Bootstrap intervals and paired tests (`report --ci`, `--vs METHOD`) on synthetic stores with per-image predictions,
and the --ci golden Markdown / LaTeX of tests/fixtures/results_ci."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mugcp_bench.commands.report import report
from mugcp_bench.report.aggregate import build_report
from mugcp_bench.report.bootstrap import BootstrapConfig, CorrectnessCache, image_counts, table_replicates
from mugcp_bench.report.published import AVERAGE
from mugcp_bench.report.statistics import hm
from mugcp_bench.report.structure import Options
from mugcp_bench.report.tidy import load_results
from mugcp_bench.store import predictions
from tests.numerics import FP32, FP64, assert_close_scaled
from tests.synthetic_results import Split, write_b2n_store

FIXTURES = Path(__file__).parent / "fixtures"
CI_RESULTS = FIXTURES / "results_ci"
GOLDEN_ARGS = ["--ci", "--vs", "coop", "--per-class", "toy_shapes", "--efficiency"]
TWO_THOUSAND = {"dtd": (Split(2000, 24), Split(2000, 23))}


def b2n(results_dir: Path, **options):
    (table,) = [t for t in build_report(load_results(results_dir), ["base2novel"], Options(**options)).tables]
    return table


def cell(table, entry: str, row: str, group: str):
    c = table.cell(entry, row, group)
    assert c is not None, (entry, row, group)
    return c


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """coop, mugcp, a copy of coop, and coop with 60 of its wrong images right (+3 points) on 2,000-image splits."""
    root = tmp_path_factory.mktemp("planted")
    return write_b2n_store(
        root, {"coop": 0.3, "mugcp": 0.32}, TWO_THOUSAND, planted={"coop_copy": ("coop", 0), "coop_plus": ("coop", 60)}
    )


def test_a_method_against_itself_contains_zero(planted: Path) -> None:
    table = b2n(planted, ci=True, vs="coop")
    for group in ("base", "novel", "hm"):
        for row in ("dtd", AVERAGE):
            c = cell(table, "coop_copy", row, group)
            assert c["delta"] == 0.0
            assert c["delta_low"] <= 0.0 <= c["delta_high"]  # paired: the same draws give exactly [0, 0]
            assert c["delta_low"] == c["delta_high"] == 0.0


def test_planted_difference_of_three_points_on_2000_images_is_detected(planted: Path) -> None:
    table = b2n(planted, ci=True, vs="coop")
    for group in ("base", "novel", "hm"):
        c = cell(table, "coop_plus", "dtd", group)
        assert c["delta"] == pytest.approx(3.0, abs=0.05)
        assert 0.0 < c["delta_low"] < 3.0 < c["delta_high"], (group, c["delta_low"], c["delta_high"])
    # the two methods' own intervals overlap: only the paired test separates them
    a, b = cell(table, "coop", "dtd", "base"), cell(table, "coop_plus", "dtd", "base")
    assert b["ci_low"] < a["ci_high"]
    md = CliRunner().invoke(report, ["--results-dir", str(planted), "--format", "md", "--ci", "--vs", "coop"]).stdout
    line = next(row for row in md.splitlines() if row.startswith("| DTD"))
    assert "(+3.00 [+" in line and "]*)" in line and "(+0.00 [+0.00, +0.00])" in line


def test_unpaired_resampling_is_wider_than_paired(planted: Path, tmp_path: Path) -> None:
    """The same planted data without per-image predictions (binomial, unpaired) gives a much wider Δ interval."""
    old = write_b2n_store(
        tmp_path / "old",
        {"coop": 0.3},
        TWO_THOUSAND,
        planted={"coop_plus": ("coop", 60)},
        without_predictions=("coop", "coop_plus"),
    )
    paired = cell(b2n(planted, ci=True, vs="coop"), "coop_plus", "dtd", "base")
    unpaired_table = b2n(old, ci=True, vs="coop")
    unpaired = cell(unpaired_table, "coop_plus", "dtd", "base")
    assert unpaired["delta"] == pytest.approx(paired["delta"])
    assert (unpaired["delta_high"] - unpaired["delta_low"]) > 2 * (paired["delta_high"] - paired["delta_low"])
    assert any("not paired" in n.text for n in unpaired_table.notes_of("ci"))


def test_same_seed_same_intervals_and_another_seed_other_draws(planted: Path) -> None:
    cols = ["ci_low", "ci_high", "delta_low", "delta_high"]
    first = b2n(planted, ci=True, vs="coop").cells[cols]
    again = b2n(planted, ci=True, vs="coop").cells[cols]
    other = b2n(planted, ci=True, vs="coop", ci_seed=7).cells[cols]
    assert first.equals(again)
    assert not first.equals(other)
    assert np.nanmax(np.abs(first.to_numpy() - other.to_numpy())) < 2.0  # other draws, same distribution


def test_paired_test_uses_the_same_resampled_images_for_both_methods(tmp_path: Path) -> None:
    store = write_b2n_store(tmp_path, {"coop": 0.3}, {"dtd": (Split(500, 10), Split(400, 10))}, seeds=(1,),
                            planted={"coop_plus": ("coop", 25)})  # fmt: skip
    table = b2n(store)
    config = BootstrapConfig(replicates=200, seed=3)
    reps = table_replicates("base2novel", table.seed_values, table.cells, config, CorrectnessCache())
    # both methods' base runs point at one test set (same test list SHA-256), so at one image draw
    assert reps.test_sets[("coop", "dtd", "base", 1)] == reps.test_sets[("coop_plus", "dtd", "base", 1)] is not None
    # and the paired difference is exactly that draw applied to the difference of their correctness vectors
    sv = table.seed_values.set_index(["entry", "group"])
    correct = {e: predictions.read(sv.loc[(e, "base"), "predictions"]).correct for e in ("coop", "coop_plus")}
    counts = np.concatenate(list(image_counts(reps.test_sets[("coop", "dtd", "base", 1)], 500, config)))
    expected = counts @ (correct["coop_plus"].astype(float) - correct["coop"]) * 100 / 500
    got = reps.difference(("coop_plus", "dtd", "base"), ("coop", "dtd", "base"))
    assert_close_scaled(got, expected, FP32, scale=100.0)  # replicates are float32 percentages (0 … 100)
    assert (got >= 0).all() and got.std() > 0  # 25 images made right: never worse, and the draw does vary


def test_hm_and_average_are_recomputed_in_every_replicate(tmp_path: Path) -> None:
    datasets = {"dtd": (Split(300, 10), Split(300, 10)), "eurosat": (Split(200, 5), Split(200, 5))}
    store = write_b2n_store(tmp_path, {"coop": 0.3}, datasets, seeds=(1, 2))
    table = b2n(store)
    reps = table_replicates("base2novel", table.seed_values, table.cells, BootstrapConfig(200), CorrectnessCache())
    v = {k[1:]: rep for k, rep in reps.values.items() if k[0] == "coop"}

    def hms(base, novel) -> list[float]:
        return [hm(b, n) for b, n in zip(base, novel)]

    for row in ("dtd", "eurosat"):
        assert_close_scaled(v[(row, "hm")], hms(v[(row, "base")], v[(row, "novel")]), FP64)
    mean_base = (v[("dtd", "base")] + v[("eurosat", "base")]) / 2
    assert_close_scaled(v[(AVERAGE, "base")], mean_base, FP64)
    assert_close_scaled(v[(AVERAGE, "hm")], hms(mean_base, v[(AVERAGE, "novel")]), FP64)  # HM of the means
    # the replicates centre on the table's values
    for group in ("base", "novel", "hm"):
        assert np.mean(v[(AVERAGE, group)]) == pytest.approx(cell(table, "coop", AVERAGE, group)["mean"], abs=1.0)


def test_intervals_do_not_depend_on_the_other_methods_in_the_report(planted: Path) -> None:
    alone = b2n(planted, ci=True, methods=("coop",))
    together = b2n(planted, ci=True)
    for group in ("base", "novel", "hm"):
        a, b = cell(alone, "coop", "dtd", group), cell(together, "coop", "dtd", group)
        assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])


def test_damaged_predictions_file_falls_back_and_says_so(tmp_path: Path, caplog) -> None:
    store = write_b2n_store(tmp_path, {"coop": 0.3}, {"dtd": (Split(100, 5), Split(100, 5))}, seeds=(1,))
    (pred_file,) = [p for p in store.rglob("*.npz") if p.name.endswith("-base.npz")]
    pred_file.write_bytes(pred_file.read_bytes()[:40])
    table = b2n(store, ci=True)
    assert "does not match the SHA-256" in caplog.text
    assert any("unusable" in n.text for n in table.notes_of("ci"))
    assert not np.isnan(cell(table, "coop", "dtd", "base")["ci_low"])  # still an interval (binomial)


def test_predictions_file_is_compact_and_reproducible(tmp_path: Path) -> None:
    labels = np.arange(1000) % 1000
    data = predictions.encode(labels[::-1], labels, np.stack([labels] * 5, axis=1), [f"c{i}" for i in range(1000)])
    assert data == predictions.encode(
        labels[::-1], labels, np.stack([labels] * 5, axis=1), [f"c{i}" for i in range(1000)]
    )
    path = tmp_path / "p.npz"
    path.write_bytes(data)
    p = predictions.read(path)
    assert p.pred.tolist() == labels[::-1].tolist() and p.top5.shape == (1000, 5) and p.classnames[7] == "c7"
    with np.load(path) as z:
        assert z["pred"].dtype == np.uint16 and z["label"].dtype == np.uint16  # 1,000 classes fit in 16 bits
    with pytest.raises(predictions.PredictionsError, match="SHA-256"):
        predictions.read(path, sha256="0" * 64)


@pytest.mark.parametrize("fmt,suffix", [("md", "md"), ("latex", "tex")])
def test_ci_report_equals_golden(fmt: str, suffix: str) -> None:
    golden = FIXTURES / f"report_ci_golden.{suffix}"
    result = CliRunner().invoke(report, ["--results-dir", str(CI_RESULTS), "--format", fmt, *GOLDEN_ARGS])
    assert result.exit_code == 0, result.output
    if os.environ.get("MUGCP_UPDATE_GOLDEN"):
        golden.write_text(result.stdout, encoding="utf-8")
    assert result.stdout == golden.read_text(encoding="utf-8")
