"""`mugcp-bench report` on the fixture results store: golden Markdown, formats, Δ, options, bad input."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from mugcp_bench.commands.report import report
from tests.factories import make_key, make_record, write_record

FIXTURES = Path(__file__).parent / "fixtures"
RESULTS = FIXTURES / "results"
GOLDEN = FIXTURES / "report_golden.md"


def run(*args: str):
    return CliRunner().invoke(report, [*args], catch_exceptions=False)


def test_markdown_report_equals_golden() -> None:
    result = run("--results-dir", str(RESULTS), "--format", "md")
    assert result.exit_code == 0, result.output
    if os.environ.get("MUGCP_UPDATE_GOLDEN"):
        GOLDEN.write_text(result.stdout, encoding="utf-8")
    assert result.stdout == GOLDEN.read_text(encoding="utf-8")


def test_golden_flags_missing_seeds_and_incomplete_average() -> None:
    text = GOLDEN.read_text(encoding="utf-8")
    b2n = text.split("### ")[1]
    toy = next(line for line in b2n.splitlines() if line.startswith("| Toy Shapes"))
    assert toy.count("(2/3)") == 3  # coop's base, novel and HM on the toy dataset: seed 3 failed
    average = next(line for line in b2n.splitlines() if line.startswith("| **Average (3)**"))
    assert average.count("†") == 3 and "(k/n) = seeds present / expected" in b2n
    assert "Runs: 48 complete; not in the tables: 1 failed, 1 running." in text
    assert "mugcp: 9.8% of descriptions name the true class (base 8.3%, novel 11.3%)." in b2n
    assert "HM of those two means (not the mean of per-dataset HMs)" in b2n
    assert "full-precision per-seed accuracies" in b2n
    ablation = text.split("### Ablation")[1]
    assert "mugcp-no-amg Δ HM" in ablation and "(1/3)" in ablation  # the variant ran 1 of mugcp's 3 seeds


def test_vs_paper_shows_delta_with_confidence_marker() -> None:
    result = run("--results-dir", str(RESULTS), "--format", "csv", "--vs", "paper")
    assert result.exit_code == 0, result.output
    cells = pd.read_csv(io.StringIO(result.stdout), keep_default_na=False, na_values=[""])
    coop = cells[(cells["table"] == "base2novel") & (cells["entry"] == "coop")].set_index(["dataset", "metric"])
    assert coop.loc[("caltech101", "base"), "ref_value"] == 98.00
    assert coop.loc[("caltech101", "base"), "ref_marker"] == "T"
    assert coop.loc[("caltech101", "base"), "delta"] == pytest.approx(coop.loc[("caltech101", "base"), "mean"] - 98.0)
    assert pd.isna(coop.loc[("toy_shapes", "base"), "delta"])  # no published number for a toy dataset
    assert pd.isna(coop.loc[("average", "hm"), "delta"])  # our 3-dataset average is not the published 11-dataset one
    dg = cells[(cells["table"] == "domain_generalization") & (cells["entry"] == "coop")].set_index("dataset")
    assert dg.loc["average", "ref_value"] == 59.28 and dg.loc["average", "ref_marker"] == "✓"
    mugcp = cells[cells["entry"] == "mugcp"]
    assert mugcp["delta"].isna().all()  # no published MuGCP number yet
    md = run("--results-dir", str(RESULTS), "--format", "md", "--protocol", "base2novel", "--vs", "paper").stdout
    (note,) = [line for line in md.splitlines() if "Precision differs" in line]
    assert "coop ran bf16-autocast" in note and "mugcp" not in note  # only entries that got a Δ are named


def test_vs_method_and_unknown_method() -> None:
    result = run("--results-dir", str(RESULTS), "--format", "md", "--protocol", "cross_dataset", "--vs", "coop")
    assert result.exit_code == 0, result.output
    dtd = next(line for line in result.stdout.splitlines() if line.startswith("| DTD"))
    assert "(+5.41)" in dtd  # mugcp 47.28 vs coop 41.87
    bad = run("--results-dir", str(RESULTS), "--vs", "cop")
    assert bad.exit_code == 2 and "Did you mean 'coop'?" in bad.output


def test_latex_and_table_and_pivot_formats(tmp_path: Path) -> None:
    out = tmp_path / "b2n.tex"
    result = run("--results-dir", str(RESULTS), "--protocol", "base2novel", "--out", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    tex = out.read_text(encoding="utf-8")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\multicolumn{3}{c}{mugcp}" in tex and r"\textbf{96.33}" in tex and r"$\pm$" in tex
    assert r"$^\dagger$" in tex and "(2/3)" in tex
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file

    text = run("--results-dir", str(RESULTS), "--protocol", "few_shot", "--format", "table").stdout
    assert "Few-shot classification" in text and "K=16" in text and "Average (2)" in text

    pivot = run("--results-dir", str(RESULTS), "--format", "csv", "--pivot", "--protocol", "base2novel").stdout
    frame = pd.read_csv(io.StringIO(pivot))
    assert list(frame["dataset"]) == ["imagenet", "caltech101", "toy_shapes", "average"]
    assert frame.loc[frame["dataset"] == "caltech101", "mugcp HM"].item() == pytest.approx(96.327339, abs=1e-5)


def test_ci_rounded_and_methods_options() -> None:
    result = run("--results-dir", str(RESULTS), "--format", "md", "--protocol", "base2novel", "--ci", "--rounded")
    assert "[95% bootstrap interval]" in result.stdout and "rounded to 1 decimal" in result.stdout
    # the fixture's records predate per-image predictions: the report says how it resampled them
    assert "Runs without stored per-image predictions (coop, mugcp; older records)" in result.stdout
    only = run("--results-dir", str(RESULTS), "--format", "md", "--protocol", "base2novel", "--methods", "coop")
    assert "coop Base" in only.stdout and "mugcp" not in only.stdout
    bad = run("--results-dir", str(RESULTS), "--methods", "mugcpp")
    assert bad.exit_code == 2 and "Did you mean 'mugcp'?" in bad.output


def test_absent_protocol_is_bad_input(tmp_path: Path) -> None:
    shutil.copytree(RESULTS / "runs" / "few_shot", tmp_path / "runs" / "few_shot")
    result = run("--results-dir", str(tmp_path), "--protocol", "base2novel")
    assert result.exit_code == 2
    assert "no complete results for protocol 'base2novel'" in result.output and "few_shot" in result.output


@pytest.mark.parametrize("make", ["missing", "empty", "only_running"])
def test_missing_or_empty_results_dir_says_so_in_one_line(tmp_path: Path, make: str) -> None:
    results = tmp_path / "results"
    if make != "missing":
        results.mkdir()
    if make == "only_running":
        write_record(results, make_record(make_key(), status="running"))
    result = run("--results-dir", str(results))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(results) in lines[0]
    expected = {"missing": "does not exist", "empty": "no results in", "only_running": "1 running"}[make]
    assert expected in lines[0]
