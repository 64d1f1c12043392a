"""Does a state dict fit a module? One line naming what does not (missing keys, extra keys, other shapes).

`torch.nn.Module.load_state_dict(strict=False)` forgives missing and extra keys but raises a multi-line
RuntimeError for every tensor of another shape; checking first turns a checkpoint of another architecture (a
backbone file, or a run's checkpoint written by another version of a method) into one readable line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mugcp_bench.errors import UserError


class StateMismatch(UserError):
    """A state dict that does not fit the module it is loaded into (one line: what is missing, extra, reshaped)."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem  # what `state_mismatch` found, without the file and module names


def _shape(t: object) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _examples(names: list[str], n: int = 2) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names)} in all)" if len(names) > n else "")


def state_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, object], required: Iterable[str] | None = None
) -> str | None:
    """One line naming how `given` differs from `expected` (keys and shapes), or None if it fits.

    required: the keys `given` must hold (default: every key of `expected`); keys outside `expected` are extra.
    """
    needed = list(expected) if required is None else [k for k in required if k in expected]
    missing = [k for k in needed if k not in given]
    extra = [k for k in given if k not in expected]
    reshaped = [k for k in given if k in expected and _shape(given[k]) != _shape(expected[k])]
    parts = []
    if reshaped:
        k = reshaped[0]
        first = f"{k} is {list(_shape(given[k]) or ())} in the file, {list(expected[k].shape)} here"
        parts.append(f"{len(reshaped)} tensors of another shape (first: {first})")
    if missing:
        parts.append(f"{len(missing)} missing ({_examples(missing)})")
    if extra:
        parts.append(f"{len(extra)} extra ({_examples(extra)})")
    return "; ".join(parts) or None


__all__ = ["StateMismatch", "state_mismatch"]
