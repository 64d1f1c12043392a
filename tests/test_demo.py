"""`mugcp-bench demo` end to end on the quick toy world: toy-world fallback of `run`, the store, the report and
the plots — what `make demo` runs, smaller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp_bench.store.records import iter_run_files
from tests.cli_harness import cli


@pytest.mark.slow
def test_demo_trains_reports_and_plots_then_trains_nothing(tmp_path: Path, capsys) -> None:
    args = ["demo", "--quick-toy", "--methods", "zsclip,coop", "--seeds", "1", "--datasets", "toy_shapes,toy_colors"]
    args += ["--results-dir", str(tmp_path), "--parallel", "2"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert "2 workers (cpu, cpu)" in err  # the runs trained side by side in two worker processes
    runs = [json.loads(p.read_text()) for p in iter_run_files(tmp_path)]
    assert sorted((r["key"]["method"], r["key"]["train_dataset"]) for r in runs) == [
        ("coop", "toy_colors"),
        ("coop", "toy_shapes"),
        ("zsclip", "toy_colors"),
        ("zsclip", "toy_shapes"),
    ]
    assert all(r["status"] == "complete" and r["key"]["backbone"] == "toy-clip" for r in runs)
    assert {r["key"]["recipe"] for r in runs} == {"toy"}
    coop = next(r for r in runs if r["key"]["method"] == "coop")
    assert coop["config"]["train"]["crop_min_scale"] == 1.0  # the toy recipes train on whole frames
    report = (tmp_path / "report.md").read_text()
    assert "Toy Shapes" in report and "Toy Colors" in report and "coop Base" in report
    # the terminal table shows the same accuracies as the stored runs
    acc = next(e for e in coop["evaluations"] if e["classes"] == "base")["accuracy"]
    assert f"{acc:.2f}" in out and f"{acc:.2f}" in report
    # intervals from the stored per-image predictions, and the efficiency table
    assert "[95% bootstrap interval]" in report and "Runs without stored per-image predictions" not in report
    efficiency = report.split("### Efficiency (base-to-novel generalization runs)")[1]
    assert "| coop | 512 |" in efficiency and "| zsclip | 0 | – (no training) |" in efficiency
    assert "peak process RSS above its start (CPU)" in efficiency
    for stem in ("b2n_hm_per_dataset", "b2n_base_vs_novel", "curves_base2novel_toy_shapes"):
        assert (tmp_path / "plots" / f"{stem}.png").stat().st_size > 10_000
    assert "demo finished" in err

    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "0 to train" in err and "4 done" in err
