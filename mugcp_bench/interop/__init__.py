"""Interoperability with the reference code: reading and writing its checkpoints (`reference`), the per-method maps
each method declares (`formats.ReferenceFormat`), our self-contained `mugcp` files (`mugcp_file`) and the image
classifier of a trained run (`classifier.load_classifier`). docs/interop.md.

Kept light: method files import `mugcp_bench.interop.formats` when their class is defined.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ReferenceFormat": "mugcp_bench.interop.formats",
    "load_classifier": "mugcp_bench.interop.classifier",
    "Classifier": "mugcp_bench.interop.classifier",
    "read_reference_file": "mugcp_bench.interop.reference",
    "load_checkpoint_file": "mugcp_bench.interop.safe_load",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mugcp_bench.interop' has no attribute {name!r}")
