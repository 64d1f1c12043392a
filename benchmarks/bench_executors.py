"""Wall time of one sweep under `--executor local`, `gpus --gpus cpu:N` (or GPU ids) and `ray`, as the user runs it.

Each measurement is a fresh `mugcp-bench run` process on a fresh results directory (start-up, worker spawn and Ray
start included), the executors interleaved round by round so that load from other jobs hits all of them. Every
executor's accuracies are checked equal to the local ones. Prints a Markdown table (and writes it with --out).

    .venv/bin/python benchmarks/bench_executors.py                       # miniature data, tiny backbone, CPU
    .venv/bin/python benchmarks/bench_executors.py --gpus 0,1 --device cuda --backbone ViT-B-16 --data-root DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def accuracies(results: Path) -> dict[str, list]:
    out = {}
    for p in sorted((results / "runs").glob("**/run.json")):
        rec = json.loads(p.read_text())
        out[rec["id"]] = sorted((e["dataset"], e["classes"], e["accuracy"]) for e in rec["evaluations"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="zsclip,coop,maple")
    ap.add_argument("--datasets", default="dtd,eurosat")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--data-root", default=None, help="default: a miniature tree built in a temp folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpus", default="cpu:2", help="the gpus executor's --gpus")
    ap.add_argument("--ray-cpus-per-run", default="1")
    ap.add_argument("--executors", default="local,gpus,ray")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    if args.data_root is None:
        sys.path.insert(0, str(ROOT))
        from tests.miniature import build_miniature

        data_root = build_miniature(work / "data", args.datasets.split(","))
    else:
        data_root = Path(args.data_root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MUGCP_CACHE": str(work / "cache")}
    base = [sys.executable, "-m", "mugcp_bench.commands.cli", "-q", "run", "--methods", args.methods]
    base += ["--datasets", args.datasets, "--seeds", args.seeds, "--data-root", str(data_root)]
    base += ["--backbone", args.backbone, "--pretrained", args.pretrained, "--device", args.device]
    base += ["--set", f"epochs={args.epochs}", "--json"]
    if args.backbone == "tiny":
        base += ["--recipe", "toy"]
    extra = {
        "local": [],
        "gpus": ["--executor", "gpus", "--gpus", args.gpus],
        "ray": ["--executor", "ray", "--ray-cpus-per-run", args.ray_cpus_per_run],
    }
    names = args.executors.split(",")
    # warm-up: fill the shared caches (few-shot subsets, frozen features) once, so no executor pays for them
    subprocess.run([*base, "--results-dir", str(work / "warmup")], env=env, check=True, capture_output=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    reference = accuracies(work / "warmup")
    for r in range(args.rounds):
        for name in names:
            results = work / f"{name}-{r}"
            cmd = [*base, *extra[name], "--results-dir", str(results)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            if accuracies(results) != reference:
                raise SystemExit(f"{name}: accuracies differ from the local run")
            times[name].append(wall)
            print(f"round {r + 1} {name}: {wall:.1f} s", file=sys.stderr)
    n_runs = len(reference)
    local = statistics.median(times["local"]) if "local" in times else None
    lines = [
        f"| executor | wall time (median of {args.rounds}), s | each round, s | speed-up vs local |",
        "|---|---:|---|---:|",
    ]
    for name in names:
        med = statistics.median(times[name])
        label = {"gpus": f"gpus --gpus {args.gpus}", "ray": f"ray (local, {args.ray_cpus_per_run} CPU/run)"}.get(
            name, name
        )
        ratio = f"{local / med:.2f}×" if local else "-"
        lines.append(f"| {label} | {med:.1f} | {', '.join(f'{t:.1f}' for t in times[name])} | {ratio} |")
    header = (
        f"{n_runs} runs ({args.methods} × {args.datasets} × seeds {args.seeds}, {args.epochs} epochs, "
        f"{args.backbone}, {args.device}, {os.cpu_count()} cores); accuracies equal under every executor"
    )
    table = header + "\n\n" + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
