"""The ablation summary of `mugcp-bench report`: Δ of the dataset average per component, mean ± std over seeds."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mugcp_bench.commands.report import report
from mugcp_bench.report.aggregate import build_report
from mugcp_bench.report.tidy import load_results
from tests.synthetic_results import Split, write_run

SPLIT = Split(n=100, n_classes=5)
# accuracy (base, novel) per (variant, dataset, seed): the full method and two variants, two datasets
ACC = {
    ("", "dtd", 1): (80.0, 70.0),
    ("", "dtd", 2): (82.0, 72.0),
    ("", "dtd", 3): (81.0, 74.0),
    ("", "eurosat", 1): (90.0, 60.0),
    ("", "eurosat", 2): (88.0, 62.0),
    ("", "eurosat", 3): (89.0, 61.0),
    ("no-scp", "dtd", 1): (79.0, 66.0),
    ("no-scp", "dtd", 2): (80.0, 70.0),
    ("no-scp", "dtd", 3): (81.0, 69.0),
    ("no-scp", "eurosat", 1): (90.0, 58.0),
    ("no-scp", "eurosat", 2): (87.0, 57.0),
    ("no-scp", "eurosat", 3): (88.0, 60.0),
    ("no-align", "dtd", 1): (81.0, 71.0),  # seed 1 only, and dtd only for seed 2: seed 2 is left out
    ("no-align", "eurosat", 1): (91.0, 61.0),
    ("no-align", "dtd", 2): (50.0, 50.0),
}


@pytest.fixture
def store(tmp_path):
    for (variant, dataset, seed), (base, novel) in ACC.items():
        evs = {"base": (SPLIT, None, base), "novel": (SPLIT, None, novel)}
        write_run(tmp_path, "mugcp", dataset, seed, evs, variant=variant, costs=False)
    return tmp_path


def hm(b, n):
    return 2 * b * n / (b + n)


def averages(variant, seed):
    base = np.mean([ACC[(variant, d, seed)][0] for d in ("dtd", "eurosat")])
    novel = np.mean([ACC[(variant, d, seed)][1] for d in ("dtd", "eurosat")])
    return np.array([base, novel, hm(base, novel)])


def test_summary_is_the_paired_seed_delta_of_the_dataset_average(store):
    rep = build_report(load_results(store))
    (summary,) = [t for t in rep.row_tables if t.name == "ablation_summary_base2novel"]
    rows = {r[0]: r for r in summary.rows}
    assert summary.header == ["Entry", "Component off", "Base", "Novel", "HM", "Seeds"]
    deltas = np.array([averages("no-scp", s) - averages("", s) for s in (1, 2, 3)])  # (seeds, metrics)
    expected = [f"{m:+.1f} ± {sd:.1f}" for m, sd in zip(deltas.mean(0), deltas.std(0, ddof=1))]
    assert rows["mugcp-no-scp"] == ["mugcp-no-scp", "scp", *expected, "3"]
    one = averages("no-align", 1) - averages("", 1)  # seed 2 lacks eurosat: not averaged over fewer datasets
    assert rows["mugcp-no-align"] == ["mugcp-no-align", "align", *[f"{v:+.1f}" for v in one], "1"]
    full = np.array([averages("", s) for s in (1, 2, 3)])
    assert rows["mugcp"][2] == f"{full[:, 0].mean():.1f} ± {full[:, 0].std(ddof=1):.1f}"
    data = summary.data.set_index(["entry", "metric"])
    assert data.loc[("mugcp-no-scp", "hm"), "delta_mean"] == pytest.approx(deltas[:, 2].mean())
    assert data.loc[("mugcp-no-scp", "novel"), "delta_std"] == pytest.approx(deltas[:, 1].std(ddof=1))


def test_report_prints_the_summary_in_every_format(store):
    md = CliRunner().invoke(report, ["--results-dir", str(store), "--format", "md"], catch_exceptions=False)
    assert md.exit_code == 0 and "summary: Δ of the dataset average per component off" in md.stdout
    assert "| mugcp-no-scp | scp |" in md.stdout
    csv = CliRunner().invoke(report, ["--results-dir", str(store), "--format", "csv"], catch_exceptions=False)
    cells = pd.read_csv(io.StringIO(csv.stdout), keep_default_na=False, na_values=[""])
    assert set(cells.loc[cells["table"] == "ablation_summary_base2novel", "entry"]) == {
        "mugcp-no-scp",
        "mugcp-no-align",
    }
    plain = CliRunner().invoke(report, ["--results-dir", str(store), "--protocol", "base2novel"])
    assert plain.exit_code == 0 and "summary" not in plain.stdout  # no ablation tables asked for: no summary
