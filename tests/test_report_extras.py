"""Per-class accuracy, the efficiency table, training curves, confusion matrices; a dataset added in one file
flows through every name and order of the report."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from mugcp_bench.commands.report import report
from mugcp_bench.datasets.checks import dataset_names
from mugcp_bench.protocols import real_suite
from mugcp_bench.registry import DATASETS
from mugcp_bench.report.aggregate import build_report
from mugcp_bench.report.comparison import paper_average_rows
from mugcp_bench.report.plots import confusion_figures, curve_figures
from mugcp_bench.report.structure import Options
from mugcp_bench.report.tidy import dataset_display, dataset_key, load_results
from tests.synthetic_results import Split, write_b2n_store

FIXTURES = Path(__file__).parent / "fixtures"
CI_RESULTS = FIXTURES / "results_ci"
OLD_RESULTS = FIXTURES / "results"


def run(*args: str):
    return CliRunner().invoke(report, [*args], catch_exceptions=False)


def test_per_class_table_and_hardest_classes(tmp_path: Path) -> None:
    store = write_b2n_store(tmp_path, {"coop": 0.3, "mugcp": 0.5}, {"dtd": (Split(240, 24), Split(230, 23))})
    results = load_results(store)
    out = run("--results-dir", str(store), "--format", "csv", "--per-class", "DTD")
    cells = pd.read_csv(io.StringIO(out.stdout))
    per_class = cells[cells["table"] == "per_class_dtd_base2novel_base"]
    assert len(per_class[per_class["entry"] == "coop"]) == 24 + 1  # 24 base classes and the class-balanced mean
    # a class's accuracy is the share of its test images predicted right, averaged over seeds
    from mugcp_bench.store import predictions

    tidy = results.tidy[(results.tidy["method"] == "coop") & (results.tidy["classes"] == "base")]
    per_seed = []
    for path in tidy["predictions"]:
        p = predictions.read(path)
        per_seed.append(100 * p.correct[p.label == 3].mean())
    got = per_class[(per_class["entry"] == "coop") & (per_class["dataset"] == "3")]["mean"].item()
    assert got == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-5)
    md = run("--results-dir", str(store), "--format", "md", "--per-class", "dtd").stdout
    assert "### Per-class accuracy: DTD, base classes (base-to-novel generalization)" in md
    assert "### Per-class accuracy: DTD, novel classes (base-to-novel generalization)" in md
    (hardest,) = [
        line for line in md.split("novel classes (base-to-novel generalization)")[0].splitlines() if "Hardest" in line
    ]
    assert hardest.split(": ", 1)[1].count(" (") == 5  # the five hardest, with their accuracy


def test_per_class_errors_name_the_problem() -> None:
    bad = run("--results-dir", str(CI_RESULTS), "--per-class", "dtdd")
    assert bad.exit_code == 2 and "no complete runs evaluated on 'dtdd'" in bad.output
    old = run("--results-dir", str(OLD_RESULTS), "--per-class", "caltech101")
    assert old.exit_code == 2 and "no per-image predictions" in old.output and "--force" in old.output


def test_efficiency_table_and_its_measures() -> None:
    md = run("--results-dir", str(CI_RESULTS), "--format", "md", "--efficiency").stdout
    section = md.split("### Efficiency (base-to-novel generalization runs)")[1]
    assert (
        "| Method | Trainable params | Train time / run (s) | Train img/s | Eval img/s | Peak memory (MB) |" in section
    )
    assert "| coop | 2,048 | 16.0 | 50.0 | 250.0 | 150.0 | Synthetic CPU | fp32 | 4 |" in section
    assert "Peak memory: peak process RSS above its start (CPU)" in section
    csv = pd.read_csv(io.StringIO(run("--results-dir", str(CI_RESULTS), "--format", "csv", "--efficiency").stdout))
    eff = csv[csv["table"] == "efficiency_base2novel"].set_index("entry")
    assert eff.loc["mugcp", "train_images_per_s"] == 60.0 and eff.loc["mugcp", "runs"] == 4
    old = run("--results-dir", str(OLD_RESULTS), "--format", "md", "--efficiency").stdout
    assert "recorded without timings or memory (older records): shown as –" in old


def test_training_curves_and_confusion_matrix_figures() -> None:
    results = load_results(CI_RESULTS)
    rep = build_report(results, None, Options())
    curves = curve_figures(rep)
    assert set(curves) == {"curves_base2novel_caltech101", "curves_base2novel_toy_shapes"}
    axes = curves["curves_base2novel_toy_shapes"].get_axes()
    assert [ax.get_title() for ax in axes][:4] == [
        "Total training loss (mean over seeds; band: range)",
        "Loss parts",
        "Learning rate",
        "Training throughput",
    ]
    assert all(ax.get_xlabel() == "Epoch" and ax.lines for ax in axes[:4])
    parts = {t.get_text() for t in axes[1].get_legend().get_texts()}
    assert parts == {"ce", "scp"}  # MuGCP's extra loss drawn on its own
    run_id = results.runs[results.runs["method"] == "mugcp"]["run_id"].iloc[0]
    confusion = confusion_figures(results, run_id)
    assert len(confusion) == 2 and all(k.startswith(f"confusion_{run_id}_base2novel_") for k in confusion)
    ax = next(iter(confusion.values())).get_axes()[0]
    assert ax.images and ax.get_xlabel().startswith("Predicted class") and "accuracy" in ax.get_title()
    bad = run("--results-dir", str(CI_RESULTS), "--confusion", run_id)
    assert bad.exit_code == 2 and "--plots" in bad.output
    unknown = run("--results-dir", str(CI_RESULTS), "--plots", "/nonexistent", "--confusion", "zzzz")
    assert unknown.exit_code == 2 and "no run with that id" in unknown.output


MY_BIRDS = """
from mugcp_bench.datasets.base import register_dataset
from mugcp_bench.datasets.zhou_json import ZhouJsonSpec

register_dataset(
    ZhouJsonSpec(
        "my_birds",
        "my-birds",
        "images",
        "split_zhou_MyBirds.json",
        "a photo of a {}, a type of bird.",
        "https://example.org/birds",
        display_name="MyBirds",
        roles=("base2novel", "cross_dataset", "few_shot"),
        aliases=("birds", "mybirds200"),
        order=10.5,  # after UCF101 (10), before the ImageNet variants (11-14)
    )
)
"""


@pytest.fixture
def my_birds_file(tmp_path: Path, monkeypatch):
    """`my_birds.py` dropped into the datasets package (a temporary folder on its search path), nothing else."""
    import sys

    import mugcp_bench.datasets as package

    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "my_birds.py").write_text(MY_BIRDS)
    DATASETS.names()  # the built-ins first
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    assert "my_birds" in package.import_dataset_modules()
    yield DATASETS.get("my_birds")
    DATASETS.unregister("my_birds")
    sys.modules.pop("mugcp_bench.datasets.my_birds", None)


def test_a_dataset_added_in_one_file_flows_through_names_and_orders(tmp_path: Path, my_birds_file) -> None:
    """A dataset file in the package (nothing else edited): the registry, --datasets, the suite, tidy's names and
    the report's row order and labels all follow its spec."""
    assert DATASETS.canonical("birds") == "my_birds"
    assert dataset_names("all").index("my_birds") == dataset_names("all").index("ucf101") + 1
    assert real_suite().base2novel[-1] == "my_birds" and "my_birds" in real_suite().cross_dataset_targets
    assert dataset_key("MyBirds200") == "my_birds" and dataset_display("my-birds") == "MyBirds"
    assert len(paper_average_rows("base2novel")) == 11  # the papers' averages do not change
    store = write_b2n_store(
        tmp_path,
        {"coop": 0.3},
        {"my_birds": (Split(60, 5), Split(60, 5)), "dtd": (Split(60, 5), Split(60, 5))},
        seeds=(1,),
    )
    table = build_report(load_results(store), ["base2novel"], Options()).tables[0]
    assert table.rows[:2] == ["dtd", "my_birds"] and table.row_labels["my_birds"] == "MyBirds"
    csv = pd.read_csv(io.StringIO(run("--results-dir", str(store), "--format", "csv").stdout))
    assert list(dict.fromkeys(csv["dataset_name"])) == ["DTD", "MyBirds", "Average (2)"]


@pytest.mark.parametrize("width", [100, 120])
@pytest.mark.parametrize("store", ["six-methods", "ci-vs"])
def test_terminal_tables_fit_the_width_and_never_cut_a_value(store, width, tmp_path):
    """The six methods of the demo, and --ci --vs zsclip (the widest cells), in blocks of methods that fit; every
    value whole, every block with its Dataset column."""
    from mugcp_bench.report.aggregate import build_report
    from mugcp_bench.report.structure import Options
    from mugcp_bench.report.tables import _grid, _plain, report_text
    from mugcp_bench.report.tidy import load_results
    from tests.synthetic_results import Split, write_b2n_store

    if store == "six-methods":
        skills = {m: 0.1 * i for i, m in enumerate(("zsclip", "coop", "cocoop", "maple", "dcp", "mugcp"))}
        datasets = {d: (Split(60, 6), Split(60, 6)) for d in ("toy_objects", "toy_shapes", "toy_colors")}
        results, options = write_b2n_store(tmp_path, skills, datasets, seeds=(1, 2, 3)), Options(ci=True)
    else:
        results, options = CI_RESULTS, Options(ci=True, vs="zsclip")
    report = build_report(load_results(results), ["base2novel"], options)
    text = report_text(report, width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    (table,) = report.tables
    blocks = [i for i, line in enumerate(lines) if line.startswith(table.title)]
    assert len(blocks) > 1  # too wide for one piece at this width
    for label, texts in _grid(table, report.options):
        assert sum(label in line for line in lines) == len(blocks)  # the Dataset column in every block
        for cell in texts:
            assert _plain(cell) in text  # no value cut or wrapped


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_efficiency_table_fits_the_width_and_never_cuts_a_value(width):
    """Headers wrap to the width of their values; where the columns still do not fit, they go in blocks, each with
    the Method column. No cell is cut with an ellipsis (the demo's log showed 'Meth…' and 'AMD EP…')."""
    from mugcp_bench.report.aggregate import build_report
    from mugcp_bench.report.efficiency import efficiency_tables
    from mugcp_bench.report.structure import Options
    from mugcp_bench.report.tables import report_text
    from mugcp_bench.report.tidy import load_results

    results = load_results(CI_RESULTS)
    report = build_report(results, ["base2novel"], Options())
    report.tables, report.footer = [], []
    report.row_tables = efficiency_tables(results, Options())
    (table,) = report.row_tables
    lines = report_text(report, width=width).splitlines()
    assert max(len(line) for line in lines) <= width
    assert not any("…" in line for line in lines)
    text = "\n".join(lines)
    for row in table.rows:
        for cell in row:
            assert cell in text
        assert sum(f" {row[0]} " in line for line in lines) == sum(line.startswith(table.title) for line in lines)


def test_two_recipes_of_one_method_name_where_each_comes_from(tmp_path):
    """KgCoOp under its authors' recipe and under DePT's re-run: two entries, and the provenance of both."""
    from mugcp_bench.registry import METHODS
    from mugcp_bench.report.aggregate import build_report
    from mugcp_bench.report.structure import Options
    from mugcp_bench.report.tidy import load_results
    from tests.factories import evaluation, make_key, make_record, write_record

    for recipe in ("paper", "dept"):
        for seed in (1, 2):
            key = make_key(method="kgcoop", recipe=recipe, seed=seed)
            evs = [evaluation("base2novel", "dtd", c, 70.0 + seed, 100) for c in ("base", "novel")]
            write_record(tmp_path, make_record(key, evaluations=evs))
    (table,) = build_report(load_results(tmp_path), ["base2novel"], Options()).tables
    assert {"kgcoop (paper)", "kgcoop (dept)"} <= set(table.entries["entry"])
    (note,) = table.notes_of("recipes")
    for recipe in ("paper", "dept"):
        source = METHODS.get("kgcoop").provenance[recipe]
        assert f"{recipe}: {source.repo}" in note.text and source.configs["base2novel"] in note.text
