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
from mugcp_bench.toy.workers import available_cores

# Runs side by side, one worker process per core up to MAX_PARALLEL. A toy run trains an 8 M-parameter CLIP on
# batches of 4 to 32 images of 32 px, mostly below the size at which torch splits an operation across threads: the
# 108 demo runs are ~440 CPU-s of 1-thread work that one process on 2 threads spread over ~570 s (docs/toy.md §4),
# while two 1-thread processes each run their own.
MAX_PARALLEL = 4
# The demo's methods: zero-shot CLIP and the five methods the suite is about, one entry each (recipe variants such
# as dcp-paper / dcp-instance are left to `run`: they would add a third of the runs and teach nothing new on toys).
DEMO_METHODS = "zsclip,coop,cocoop,maple,dcp,mugcp"


def default_parallel() -> int:
    """Worker processes for the demo's runs on this machine: one per core up to MAX_PARALLEL (1: this process)."""
    return max(1, min(available_cores(), MAX_PARALLEL))


@click.command("demo")
@click.option("--methods", default=DEMO_METHODS, show_default=True, help="Methods.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Seeds (three fit the 15-minute CPU budget).")
@click.option("--datasets", default=None, help="Toy datasets (default: the toy suite's base-to-novel datasets).")
@click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Runs side by side, each in a worker process with its share of the cores (default: one per core, up to "
    f"{MAX_PARALLEL}; 1 runs them in this process, as `run` does).",
)
@click.option("--quick-toy", is_flag=True, hidden=True, help="Use the quick toy world (tests).")
def demo(
    methods: str, seeds: str, datasets: str | None, results_dir: Path, parallel: int | None, quick_toy: bool
) -> None:
    """Toy-world base-to-novel for every method, then the table (with 95% bootstrap intervals) and the efficiency
    table in the terminal and RESULTS_DIR/report.md, and plots (training curves too) in RESULTS_DIR/plots."""
    console = Console(stderr=True)
    t0 = time.perf_counter()
    args = ["--methods", methods, "--seeds", seeds, "--results-dir", str(results_dir), "--keep-going"]
    parallel = default_parallel() if parallel is None else parallel
    if parallel > 1:  # CPU worker processes (the `gpus` executor's CPU mode): same runs, same records
        args += ["--executor", "gpus", "--gpus", f"cpu:{parallel}"]
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
