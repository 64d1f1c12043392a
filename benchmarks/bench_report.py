"""How long `report --ci` takes on a full base-to-novel table: 11 datasets x 6 methods x 3 seeds.

The store is synthetic (tests/synthetic_results.py) with the real test-split sizes of the 11 datasets' base and
novel halves (134,000 images per method and seed; ImageNet 25,000 + 25,000) and per-image predictions beside every
run.json, as `mugcp-bench run` writes them. Measured: building the report without intervals, with --ci (default
1,000 replicates), and with --ci --vs coop (adds the paired differences); the bootstrap's share is the difference.

    python benchmarks/bench_report.py            # prints the timings (seconds, this machine)
    python benchmarks/bench_report.py --replicates 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mugcp_bench.report.aggregate import build_report  # noqa: E402
from mugcp_bench.report.structure import Options  # noqa: E402
from mugcp_bench.report.tidy import load_results  # noqa: E402
from tests.synthetic_results import Split, write_b2n_store  # noqa: E402

# (base test images, base classes), (novel test images, novel classes) of the CoOp splits
SPLITS = {
    "imagenet": ((25000, 500), (25000, 500)),
    "caltech101": ((1549, 50), (916, 50)),
    "oxford_pets": ((1881, 19), (1788, 18)),
    "stanford_cars": ((4002, 98), (4039, 98)),
    "oxford_flowers": ((1053, 51), (1410, 51)),
    "food101": ((15300, 51), (15000, 50)),
    "fgvc_aircraft": ((1666, 50), (1667, 50)),
    "sun397": ((9950, 199), (9900, 198)),
    "dtd": ((864, 24), (828, 23)),
    "eurosat": ((4200, 5), (3900, 5)),
    "ucf101": ((1934, 51), (1849, 50)),
}
SKILLS = {"zsclip": 0.0, "coop": 0.3, "cocoop": 0.35, "maple": 0.45, "dcp": 0.5, "mugcp": 0.55}


def timed(results, options: Options) -> tuple[float, float]:
    """(wall, CPU) seconds of one report build (CPU time: what a shared machine's load does not inflate)."""
    t0, c0 = time.perf_counter(), time.process_time()
    build_report(results, ["base2novel"], options)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicates", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        datasets = {d: (Split(*b), Split(*n)) for d, (b, n) in SPLITS.items()}
        write_b2n_store(Path(tmp), SKILLS, datasets, seeds=(1, 2, 3))
        results = load_results(tmp)
        print(f"store: {len(results.runs)} runs, {len(results.tidy)} evaluations, {time.perf_counter() - t0:.1f} s")
        plain = timed(results, Options())
        ci = timed(results, Options(ci=True, ci_replicates=args.replicates))
        vs = timed(results, Options(ci=True, ci_replicates=args.replicates, vs="coop"))
    for name, (wall, cpu) in (
        ("report without intervals", plain),
        (f"report --ci ({args.replicates} replicates)", ci),
        ("report --ci --vs coop", vs),
    ):
        extra = f"  (bootstrap: {cpu - plain[1]:.2f} s CPU)" if wall is not plain[0] else ""
        print(f"{name:34s} {wall:6.2f} s wall, {cpu:6.2f} s CPU{extra}")


if __name__ == "__main__":
    main()
