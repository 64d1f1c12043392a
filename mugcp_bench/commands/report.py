"""`mugcp-bench report`: tables (terminal, Markdown, LaTeX, CSV) and plots from a results directory."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import click

from mugcp_bench.atomic import atomic_write_text
from mugcp_bench.commands.params import NameList, ids
from mugcp_bench.errors import UserError
from mugcp_bench.registry import suggest
from mugcp_bench.report.aggregate import build_report, report_protocols
from mugcp_bench.report.efficiency import efficiency_tables
from mugcp_bench.report.per_class import per_class_tables
from mugcp_bench.report.structure import Options
from mugcp_bench.report.tables import FORMATS, SUFFIX_FORMATS, TEXT_WIDTH, render
from mugcp_bench.report.tidy import load_results
from mugcp_bench.runs.options import parse_ints

log = logging.getLogger(__name__)


class _BadInput(click.ClickException):
    """A UserError shown by click as one line, exit code 2."""

    exit_code = UserError.exit_code


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    return items or None


def _seeds(value: str | None) -> tuple[int, ...] | None:
    items = parse_ints(value, "seeds")
    return tuple(sorted(set(items))) if items else None


def _format(fmt: str | None, out: Path | None) -> str:
    if fmt:
        return fmt
    if out is not None:
        return SUFFIX_FORMATS.get(out.suffix.lower(), "table")
    return "table"


@click.command("report")
@click.option(
    "--results-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("results"),
    show_default=True,
    help="Results root holding runs/**/run.json.",
)
@click.option(
    "--protocol",
    type=NameList(),
    default="all",
    show_default=True,
    help="Tables to show: base2novel, cross_dataset, domain_generalization, few_shot, ablation (comma-separated); "
    "'all' shows every protocol present plus the ablation tables.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Output format [default: from the --out suffix (.md, .tex, .csv), else table].",
)
@click.option("--pivot", is_flag=True, help="With --format csv: the paper layout (one column per method and metric).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write to FILE (atomic).")
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Write PNG+PDF plots to DIR.",
)
@click.option("--vs", default=None, help="Show Δ against 'paper' (the published numbers) or a METHOD of the report.")
@click.option(
    "--seeds", default=None, type=ids(), help="Expected seeds, e.g. 1,2,3 or 1-3 (others are ignored; missing flagged)."
)
@click.option(
    "--ci",
    is_flag=True,
    help="95% bootstrap intervals (seeds and test images resampled, paired across methods) instead of the std; "
    "with --vs, the interval of each Δ (* = excludes 0).",
)
@click.option("--ci-seed", default=0, show_default=True, type=int, help="Random seed of the bootstrap.")
@click.option(
    "--ci-replicates", default=1000, show_default=True, type=click.IntRange(100, 100_000), help="Bootstrap replicates."
)
@click.option("--rounded", is_flag=True, help="Average the 1-decimal per-seed values the reference parser reads.")
@click.option(
    "--methods",
    default=None,
    type=NameList(),
    help="Only these methods, e.g. coop,mugcp (a method name includes its variants).",
)
@click.option(
    "--per-class",
    "per_class",
    default=None,
    metavar="DATASET",
    help="Add per-class accuracy tables (and the hardest classes) for DATASET[,DATASET] or 'all'.",
)
@click.option("--efficiency", is_flag=True, help="Add the efficiency table: parameters, time, images/s, memory.")
@click.option(
    "--by-config",
    is_flag=True,
    help="Runs of one method with other settings (run --grid, --set) are separate entries, named by the settings "
    "that differ (default: the most recently written run of each seed).",
)
@click.option(
    "--confusion",
    default=None,
    metavar="RUN",
    help="With --plots: confusion matrices of one run (its id, e.g. 36fc4afb, or its folder).",
)
def report(
    results_dir: Path,
    protocol: str,
    fmt: str | None,
    pivot: bool,
    out: Path | None,
    plots_dir: Path | None,
    vs: str | None,
    seeds: str | None,
    ci: bool,
    ci_seed: int,
    ci_replicates: int,
    rounded: bool,
    methods: str | None,
    per_class: str | None,
    efficiency: bool,
    by_config: bool,
    confusion: str | None,
) -> None:
    """Aggregate seeds and datasets into paper-style tables, Δ against published numbers or a method (with paired
    bootstrap intervals), per-class accuracy, the efficiency table, and plots."""
    try:
        fmt = _format(fmt, out)
        if pivot and fmt != "csv":
            raise UserError("--pivot only applies to --format csv")
        if confusion and plots_dir is None:
            raise UserError("--confusion draws plots: pass --plots DIR as well")
        known = report_protocols()
        for name in [] if protocol == "all" else protocol.split(","):
            if name not in known:  # before reading anything
                raise UserError(f"unknown protocol '{name}'.{suggest(name, known)} Protocols: {', '.join(known)}, all")
        options = Options(
            rounded=rounded,
            ci=ci,
            ci_seed=ci_seed,
            ci_replicates=ci_replicates,
            seeds=_seeds(seeds),
            methods=_split(methods),
            vs=vs,
            by_config=by_config,
        )
        results = load_results(results_dir)
        counts = results.status_counts()
        if set(counts) - {"complete"}:
            log.info("runs by status: %s (only complete runs are reported)", counts)
        rep = build_report(results, None if protocol == "all" else protocol.split(","), options)
        if per_class:
            rep.tables += per_class_tables(results, _split(per_class) or ("all",), options)
        if efficiency:
            rep.row_tables += efficiency_tables(results, options)
        tty = out is None and sys.stdout.isatty()
        # a terminal's width, else 120 (a pipe or a file): the terminal table is split into blocks of methods that
        # fit; the wide table in one piece is --format md / latex / csv
        width = shutil.get_terminal_size().columns if tty else TEXT_WIDTH
        text = render(rep, fmt, pivot=pivot, width=width, color=tty and fmt == "table")
        if out is not None:
            atomic_write_text(out, text)
            click.echo(f"wrote {out}", err=True)
        else:
            click.echo(text, nl=False)
        if plots_dir is not None:
            from mugcp_bench.report.plots import confusion_figures, make_plots, save_figure  # matplotlib: only here

            written = make_plots(rep, plots_dir)
            if confusion:
                for stem, fig in confusion_figures(results, confusion).items():
                    written += save_figure(fig, plots_dir, stem)
            click.echo(f"wrote {len(written) // 2} plots (PNG and PDF) to {plots_dir}", err=True)
    except UserError as exc:
        raise _BadInput(str(exc)) from exc
