"""`mugcp-bench demo`: the toy world end to end — base-to-novel for zero-shot CLIP and every method, then the report.

What `make demo` runs. Offline, on the CPU, in the same code path as the real benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console

from mugcp_bench.commands.report import report
from mugcp_bench.commands.run import run
from mugcp_bench.errors import RunFailed


@click.command("demo")
@click.option("--methods", default=None, help="Methods [default: the default set, as `run`].")
@click.option("--seeds", default="1,2,3", show_default=True, help="Seeds (three fit the 15-minute CPU budget).")
@click.option("--datasets", default=None, help="Toy datasets (default: the toy suite's base-to-novel datasets).")
@click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--quick-toy", is_flag=True, hidden=True, help="Use the quick toy world (tests).")
def demo(methods: str | None, seeds: str, datasets: str | None, results_dir: Path, quick_toy: bool) -> None:
    """Toy-world base-to-novel for every method, then the table (with 95% bootstrap intervals) and the efficiency
    table in the terminal and RESULTS_DIR/report.md, and plots (training curves too) in RESULTS_DIR/plots."""
    console = Console(stderr=True)
    t0 = time.perf_counter()
    args = ["--seeds", seeds, "--results-dir", str(results_dir), "--keep-going"]
    if methods:
        args += ["--methods", methods]
    if datasets:
        args += ["--datasets", datasets]
    if quick_toy:
        args.append("--quick-toy")
    failed: RunFailed | None = None
    try:
        run.main(args, standalone_mode=False)
    except RunFailed as e:  # report what did finish, then exit 1
        failed = e
    # the table with 95% bootstrap intervals (seeds and test images resampled) and what each method costs
    shown = ["--results-dir", str(results_dir), "--protocol", "base2novel", "--ci", "--efficiency"]
    report.main([*shown, "--plots", str(results_dir / "plots")], standalone_mode=False)
    report.main([*shown, "--out", str(results_dir / "report.md")], standalone_mode=False)
    console.print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; table in {results_dir / 'report.md'}, "
        f"plots in {results_dir / 'plots'}"
    )
    if failed is not None:
        raise failed
