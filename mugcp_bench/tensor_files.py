"""Tensors to files, atomically: `torch.save` through `mugcp_bench.atomic` (checkpoints, models, feature caches).

Kept apart from `atomic` so that the modules that never touch tensors (the store, the report) never import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mugcp_bench.atomic import atomic_path


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) dict / list / tuple: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` atomically (checkpoints, feature caches)."""
    # through a Python file object: a full disk surfaces as the OSError behind torch's RuntimeError
    with atomic_path(path, size_hint=lambda: max(tensor_bytes(obj), 1)) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


__all__ = ["atomic_torch_save", "tensor_bytes"]
