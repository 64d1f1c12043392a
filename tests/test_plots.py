"""Every report plot from the fixture results: non-empty, labelled axes, legend, title; PNG and PDF written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from mugcp_bench.registry import METHODS
from mugcp_bench.report.aggregate import build_report
from mugcp_bench.report.plots import make_plots, method_color, report_figures
from mugcp_bench.report.structure import Options
from mugcp_bench.report.tidy import load_results

RESULTS = Path(__file__).parent / "fixtures" / "results"
EXPECTED = {"b2n_hm_per_dataset", "b2n_base_vs_novel", "b2n_hm_radar", "few_shot_curves", "ablation_base2novel"}


@pytest.fixture(scope="module")
def fixture_report():
    return build_report(load_results(RESULTS), None, Options())


@pytest.fixture(scope="module")
def figures(fixture_report) -> dict[str, Figure]:
    return report_figures(fixture_report)


def test_all_plots_are_produced(figures: dict[str, Figure]) -> None:
    assert set(figures) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plot_has_data_labels_legend_and_title(figures: dict[str, Figure], name: str) -> None:
    fig = figures[name]
    axes = [ax for ax in fig.get_axes() if ax.get_visible()]
    assert axes
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    assert title or all(ax.get_title() for ax in axes)
    for ax in axes:
        assert ax.lines or ax.patches or ax.collections, f"{name}: empty axes"
        assert ax.get_xlabel(), f"{name}: no x label"
        if ax.name == "polar":
            assert "radius" in ax.get_xlabel()  # the radar's one label names both coordinates
        else:
            assert ax.get_ylabel(), f"{name}: no y label"
    legends = [c for ax in axes for c in ax.get_children() if isinstance(c, Legend)] + list(fig.legends)
    assert legends and all(leg.get_texts() for leg in legends)
    assert any("coop" in t.get_text() or "mugcp" in t.get_text() for leg in legends for t in leg.get_texts())


def test_plot_colours_are_fixed_per_method(figures: dict[str, Figure]) -> None:
    mugcp = METHODS.get("mugcp").color  # what the method class declares and its runs record
    assert method_color("mugcp", color=mugcp) == mugcp
    assert method_color("my_method") == method_color("my_method")  # stable for unknown names too
    assert method_color("mugcp", "no-amg", mugcp) != mugcp
    bars = figures["b2n_hm_per_dataset"].get_axes()[0]
    legend = bars.get_legend()
    colours = {t.get_text(): h.get_facecolor() for h, t in zip(legend.legend_handles, legend.get_texts())}
    assert colours["coop"] == to_rgba(METHODS.get("coop").color)


def test_make_plots_writes_png_and_pdf(fixture_report, tmp_path: Path) -> None:
    written = make_plots(fixture_report, tmp_path / "plots")
    names = {p.name for p in written}
    assert names == {f"{stem}.{ext}" for stem in EXPECTED for ext in ("png", "pdf")}
    for path in written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
        assert path.stat().st_size > 5000
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left behind


def test_plots_without_data_are_skipped(tmp_path: Path, caplog) -> None:
    shutil.copytree(RESULTS / "runs" / "xd", tmp_path / "runs" / "xd")
    report = build_report(load_results(tmp_path), None, Options())
    with caplog.at_level("INFO", logger="mugcp_bench.report.plots"):
        assert make_plots(report, tmp_path / "plots") == []
    assert "skipping the few-shot curves" in caplog.text
