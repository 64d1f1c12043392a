"""mugcp-bench: a benchmark and ablation suite for prompt learning on CLIP.

The Python API (imported on first use, so `import mugcp_bench` stays light):

    from mugcp_bench import run_sweep
    df = run_sweep(methods="coop", datasets="toy_shapes", seeds=[1]).table()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "run_sweep": "mugcp_bench.runs.sweep",
    "SweepOptions": "mugcp_bench.runs.sweep",
    "SweepResult": "mugcp_bench.runs.sweep",
    "Reporter": "mugcp_bench.runs.sweep",
    "load_results": "mugcp_bench.report.tidy",
    "load_classifier": "mugcp_bench.interop.classifier",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mugcp_bench' has no attribute {name!r}")
